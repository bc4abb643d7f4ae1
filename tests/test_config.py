"""
Configuration: defaults, ${ENV} interpolation, and one clear error per bad
configuration, naming the key it is about.
"""

import os

import pytest
import yaml

from artifact_vault.config import ConfigError, load, parse


def http_backend(**config):
    return {"type": "http", "config": {"prefix": "/files/", "base_url": "http://example.org/pub", **config}}


def config_error(document, environ=None, **kw) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        parse(document, environ={} if environ is None else environ, **kw)
    return info.value


def assert_names(error: ConfigError, key: str, *words):
    """The message is "<key>: <problem>", and the problem says what is wrong."""
    message = str(error)
    assert message.startswith(f"{key}: "), message
    assert error.key == key
    problem = message[len(key) + 2:]
    assert problem.strip(), message
    for word in words:
        assert word.lower() in problem.lower(), message
    assert "\n" not in message


# -- defaults ----------------------------------------------------------------


def test_empty_document_gives_the_defaults(tmp_path):
    config = parse({}, environ={"XDG_CACHE_HOME": str(tmp_path / "xdg")})
    assert config.http_host == "localhost"
    assert config.http_port == 8080
    assert config.log_level == "INFO"
    assert config.backends == ()
    assert config.cache_dir == str(tmp_path / "xdg" / "artifact-vault")
    assert parse(None, environ={"XDG_CACHE_HOME": str(tmp_path)}).http_port == 8080


def test_cache_dir_falls_back_to_home_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    config = parse({}, environ={})
    assert config.cache_dir == str(tmp_path / ".cache" / "artifact-vault")


def test_cache_dir_from_document_and_override(tmp_path):
    config = parse({"cache_dir": str(tmp_path / "c")}, environ={})
    assert config.cache_dir == str(tmp_path / "c")
    config = parse({"cache_dir": str(tmp_path / "c")}, environ={}, cache_dir=str(tmp_path / "override"))
    assert config.cache_dir == str(tmp_path / "override")
    # Relative paths become absolute (twistd may chdir).
    assert os.path.isabs(parse({"cache_dir": "rel/cache"}, environ={}).cache_dir)


def test_http_backend_defaults():
    config = parse({"backends": [http_backend()]}, environ={})
    (b,) = config.backends
    assert b.type == "http"
    assert b.name == "files"
    assert b.prefix == "/files/"
    assert b.base_url == "http://example.org/pub"
    assert b.timeout == 60
    assert b.max_redirects == 5
    assert dict(b.headers) == {}


def test_http_backend_explicit_values():
    backend = http_backend(timeout=2.5, max_redirects=0, headers={"X-Api-Key": "k"}, base_url="https://e.org/x/")
    backend["name"] = "mirror"
    (b,) = parse({"backends": [backend], "log_level": "debug", "http_port": 9000, "http_host": "0.0.0.0"},
                 environ={}).backends
    assert b.name == "mirror"
    assert b.timeout == 2.5
    assert b.max_redirects == 0
    assert dict(b.headers) == {"X-Api-Key": "k"}
    assert b.base_url == "https://e.org/x"


def test_huggingface_backend_defaults():
    config = parse({"backends": [{"type": "huggingface"}]}, environ={})
    (b,) = config.backends
    assert b.type == "huggingface"
    assert b.prefix == "/huggingface/"
    assert b.base_url == "https://huggingface.co"
    assert b.timeout == 60
    assert b.max_redirects == 5
    assert set(b.options) >= {"token", "revision_ttl", "offline_timeout"}
    assert not b.options["token"]


def test_huggingface_backend_extra_keys():
    (b,) = parse({"backends": [{"type": "huggingface", "name": "hub", "config": {
        "token": "hf_x", "revision_ttl": 0, "offline_timeout": 2, "prefix": "/hf/"}}]}, environ={}).backends
    assert (b.name, b.prefix) == ("hub", "/hf/")
    assert b.options["token"] == "hf_x"
    assert b.options["revision_ttl"] == 0
    assert b.options["offline_timeout"] == 2


def test_config_is_frozen():
    config = parse({"backends": [http_backend()]}, environ={})
    with pytest.raises(Exception):
        config.http_port = 1
    with pytest.raises(Exception):
        config.backends[0].headers["X"] = "y"


def test_load_without_path_is_the_embedded_default(tmp_path):
    config = load(None, environ={"XDG_CACHE_HOME": str(tmp_path)})
    assert (config.http_host, config.http_port) == ("localhost", 8080)
    assert [(b.type, b.prefix) for b in config.backends] == [("huggingface", "/huggingface/")]


def test_load_reads_a_file(tmp_path):
    path = tmp_path / "vault.yml"
    path.write_text(
        "http_host: 127.0.0.1\n"
        "http_port: 8123\n"
        "cache_dir: ${ROOT}/cache\n"
        "log_level: WARNING\n"
        "backends:\n"
        "  - type: http\n"
        "    name: files\n"
        "    config: {prefix: /files/, base_url: 'http://127.0.0.1:9/'}\n"
    )
    config = load(str(path), environ={"ROOT": str(tmp_path)})
    assert config.http_port == 8123
    assert config.cache_dir == str(tmp_path / "cache")
    assert config.log_level == "WARNING"
    assert config.backends[0].base_url == "http://127.0.0.1:9"


# -- interpolation -----------------------------------------------------------


def test_interpolation_everywhere():
    environ = {"HOST": "0.0.0.0", "PORT": "9090", "UP": "https://mirror.example", "KEY": "secret",
               "TTL": "30", "EMPTY": ""}
    document = {
        "http_host": "${HOST}",
        "http_port": "${PORT}",
        "backends": [
            {"type": "http", "name": "m", "config": {
                "prefix": "/${NOPE:-mirror}/", "base_url": "${UP}/pub",
                "headers": {"Authorization": "Bearer ${KEY}"}, "timeout": "${TTL}"}},
            {"type": "huggingface", "config": {"token": "${HF_TOKEN}", "revision_ttl": "${EMPTY:-5}"}},
        ],
    }
    config = parse(document, environ=environ)
    assert config.http_host == "0.0.0.0"
    assert config.http_port == 9090
    m, hf = config.backends
    assert m.prefix == "/mirror/"
    assert m.base_url == "https://mirror.example/pub"
    assert m.headers["Authorization"] == "Bearer secret"
    assert m.timeout == 30
    assert hf.options["token"] == ""          # unset, no default: empty string
    assert hf.options["revision_ttl"] == 5    # set but empty: the default


def test_interpolation_unset_without_default_is_empty_and_set_value_wins():
    document = {"backends": [http_backend(base_url="http://h${UNSET}.example${DOMAIN:-.org}")]}
    assert parse(document, environ={}).backends[0].base_url == "http://h.example.org"
    assert parse(document, environ={"DOMAIN": ".net", "UNSET": "2"}).backends[0].base_url == "http://h2.example.net"


def test_interpolation_uses_the_given_environ_not_os_environ(monkeypatch):
    monkeypatch.setenv("VAULT_TEST_PORT", "1234")
    assert parse({"http_port": "${VAULT_TEST_PORT:-4321}"}, environ={}).http_port == 4321
    assert parse({"http_port": "${VAULT_TEST_PORT:-4321}"}, environ=os.environ).http_port == 1234


def test_interpolated_values_are_validated():
    assert_names(config_error({"http_port": "${PORT}"}, environ={"PORT": "abc"}), "http_port")
    error = config_error({"backends": [http_backend(base_url="${UP}")]}, environ={})
    assert_names(error, "backends[0].config.base_url")


def test_malformed_reference_is_an_error():
    assert_names(config_error({"http_host": "${oops"}), "http_host", "${")


# -- bad configurations, each naming its key ---------------------------------


def test_unreadable_file(tmp_path):
    missing = tmp_path / "missing.yml"
    with pytest.raises(ConfigError) as info:
        load(str(missing), environ={})
    assert str(missing) in str(info.value)
    assert "cannot read" in str(info.value)
    with pytest.raises(ConfigError) as info:
        load(str(tmp_path), environ={})  # a folder
    assert str(tmp_path) in str(info.value)


def test_file_not_utf8(tmp_path):
    path = tmp_path / "latin1.yml"
    path.write_bytes(b"http_host: caf\xe9\n")
    with pytest.raises(ConfigError) as info:
        load(str(path), environ={})
    assert str(path) in str(info.value) and "UTF-8" in str(info.value)


def test_yaml_syntax_error(tmp_path):
    path = tmp_path / "broken.yml"
    path.write_text("http_port: 8080\nbackends: [\n  - type: http\n")
    with pytest.raises(ConfigError) as info:
        load(str(path), environ={})
    message = str(info.value)
    assert str(path) in message and "YAML" in message and "line" in message
    assert "\n" not in message


def test_document_not_a_mapping():
    with pytest.raises(ConfigError):
        parse(["http_port", 1], environ={})


def test_unknown_top_level_key():
    assert_names(config_error({"http_prot": 8080}), "http_prot", "unknown")


def test_unknown_backend_entry_key():
    backend = http_backend()
    backend["prefix"] = "/x/"
    assert_names(config_error({"backends": [backend]}), "backends[0].prefix", "unknown")


def test_unknown_backend_config_key():
    assert_names(config_error({"backends": [http_backend(base_ulr="http://x")]}),
                 "backends[0].config.base_ulr", "unknown")
    # huggingface-only keys are unknown to http backends
    assert_names(config_error({"backends": [http_backend(token="t")]}), "backends[0].config.token", "unknown")


def test_unknown_backend_type():
    error = config_error({"backends": [{"type": "ftp", "config": {"base_url": "http://x/"}}]})
    assert_names(error, "backends[0].type", "ftp")
    assert_names(config_error({"backends": [{"config": {}}]}), "backends[0].type")


def test_backends_not_a_list_and_entry_not_a_mapping():
    assert_names(config_error({"backends": {"type": "http"}}), "backends")
    assert_names(config_error({"backends": ["http"]}), "backends[0]")
    assert_names(config_error({"backends": [{"type": "http", "config": ["x"]}]}), "backends[0].config")


def test_missing_base_url_for_http():
    assert_names(config_error({"backends": [{"type": "http", "config": {"prefix": "/files/"}}]}),
                 "backends[0].config.base_url", "required")


@pytest.mark.parametrize("url", ["ftp://example.org/pub", "example.org/pub", "file:///etc", "http://", "",
                                 "http://user:pw@example.org/"])
def test_base_url_not_http(url):
    assert_names(config_error({"backends": [http_backend(base_url=url)]}), "backends[0].config.base_url")


def test_base_url_not_a_string():
    assert_names(config_error({"backends": [http_backend(base_url=42)]}), "backends[0].config.base_url")


@pytest.mark.parametrize("prefix", ["files/", "/files", "files", "/", "//", "/a//b/", "/../", "/a b/"])
def test_bad_prefix(prefix):
    assert_names(config_error({"backends": [http_backend(prefix=prefix)]}), "backends[0].config.prefix")


def test_duplicate_prefix():
    first = {**http_backend(), "name": "a"}
    second = {**http_backend(), "name": "b"}
    error = config_error({"backends": [first, second]})
    assert_names(error, "backends[1].config.prefix", "/files/", "backends[0]")
    # the default huggingface prefix counts too
    error = config_error({"backends": [{"type": "huggingface"},
                                       {"type": "http", "name": "x", "config": {"prefix": "/huggingface/",
                                                                                 "base_url": "http://e.org"}}]})
    assert_names(error, "backends[1].config.prefix")


def test_duplicate_name():
    first = {**http_backend(prefix="/a/"), "name": "same"}
    second = {**http_backend(prefix="/b/"), "name": "same"}
    assert_names(config_error({"backends": [first, second]}), "backends[1].name", "same")


@pytest.mark.parametrize("name", ["", "a/b", "_vault", "..", 5])
def test_bad_name(name):
    assert_names(config_error({"backends": [{**http_backend(), "name": name}]}), "backends[0].name")


@pytest.mark.parametrize("port", [0, 70000, -1, "abc", "", True, 80.5, None])
def test_bad_port(port):
    assert_names(config_error({"http_port": port}), "http_port", "port")


def test_port_bounds_are_inclusive():
    assert parse({"http_port": 1}, environ={}).http_port == 1
    assert parse({"http_port": 65535}, environ={}).http_port == 65535
    assert parse({"http_port": "8081"}, environ={}).http_port == 8081


@pytest.mark.parametrize("host", ["", "a host", 42])
def test_bad_host(host):
    assert_names(config_error({"http_host": host}), "http_host")


@pytest.mark.parametrize("level", ["VERBOSE", "", 10, None])
def test_bad_log_level(level):
    assert_names(config_error({"log_level": level}), "log_level")


def test_log_levels_accepted():
    for level in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL", "warning"):
        assert parse({"log_level": level}, environ={}).log_level == level.upper()


@pytest.mark.parametrize("timeout", [-1, 0, "abc", "", True, [1]])
def test_bad_timeout(timeout):
    assert_names(config_error({"backends": [http_backend(timeout=timeout)]}), "backends[0].config.timeout")


@pytest.mark.parametrize("limit", [-1, 51, 1.5, "many", True])
def test_bad_max_redirects(limit):
    assert_names(config_error({"backends": [http_backend(max_redirects=limit)]}),
                 "backends[0].config.max_redirects")


@pytest.mark.parametrize("headers", [["X: y"], {"X": 1}, {"Bad Name": "v"}, {"X": "a\r\nEvil: 1"}])
def test_bad_headers(headers):
    assert_names(config_error({"backends": [http_backend(headers=headers)]}), "backends[0].config.headers")


@pytest.mark.parametrize("key,value", [("revision_ttl", -1), ("offline_timeout", 0), ("token", 5)])
def test_bad_huggingface_options(key, value):
    assert_names(config_error({"backends": [{"type": "huggingface", "config": {key: value}}]}),
                 f"backends[0].config.{key}")


def test_error_names_the_right_index():
    backends = [http_backend(), {"type": "http", "name": "b", "config": {"prefix": "/b/", "base_url": "gopher://x"}}]
    assert_names(config_error({"backends": backends}), "backends[1].config.base_url")


def test_yaml_document_round_trip(tmp_path):
    """A sample written the way the documentation shows it parses to what it says."""
    text = yaml.safe_dump({"backends": [http_backend(), {"type": "huggingface", "config": {"token": "${T}"}}]})
    path = tmp_path / "c.yml"
    path.write_text(text)
    config = load(str(path), environ={"T": "tok"})
    assert [b.prefix for b in config.backends] == ["/files/", "/huggingface/"]
    assert config.backends[1].options["token"] == "tok"


# -- oci ------------------------------------------------------------------------


def oci_backend(name="hub", **config):
    return {"type": "oci", "name": name, "config": {"registry": "docker.io", "base_url": "https://r.example", **config}}


def test_oci_backend_defaults_and_values():
    (b,) = parse({"backends": [oci_backend()]}, environ={}).backends
    assert (b.prefix, b.base_url) == ("/hub/", "https://r.example")
    assert dict(b.options) == {"registry": "docker.io", "default": False, "username": "", "password": "",
                               "tag_ttl": 300, "offline_timeout": 4}
    (b,) = parse({"backends": [oci_backend(default="${D}", tag_ttl="${T}", password="${P}")]},
                 environ={"D": "true", "T": "0", "P": "secret"}).backends
    assert (b.options["default"], b.options["tag_ttl"], b.options["password"]) == (True, 0, "secret")


@pytest.mark.parametrize("registry", ["Docker.io", "docker.io/x", "-a.io", "a..io", "a.io:port", "", "a b"])
def test_bad_oci_registry(registry):
    assert_names(config_error({"backends": [oci_backend(registry=registry)]}), "backends[0].config.registry",
                 "registry")


def test_oci_registry_required_and_unique_and_one_default():
    document = {"backends": [{"type": "oci", "config": {"base_url": "https://r.example"}}]}
    assert_names(config_error(document), "backends[0].config.registry", "required")
    document = {"backends": [oci_backend("a"), oci_backend("b")]}
    assert_names(config_error(document), "backends[1].config.registry", "docker.io", "backends[0]")
    document = {"backends": [oci_backend("a", default=True), oci_backend("b", registry="ghcr.io", default=True)]}
    assert_names(config_error(document), "backends[1].config.default", "one")
    assert_names(config_error({"backends": [oci_backend(default="maybe")]}), "backends[0].config.default",
                 "true or false")
    assert_names(config_error({"backends": [oci_backend(tag_ttl=-1)]}), "backends[0].config.tag_ttl", "0 or more")
    assert_names(config_error({"backends": [{"type": "oci", "config": {"registry": "ghcr.io"}}]}),
                 "backends[0].config.base_url", "required")
