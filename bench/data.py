"""
The files the suite serves: big random files and a small config.json.

Big files are written once per data folder from a 16 MiB block of
``os.urandom`` that is rotated by a different offset for every block, so no
two blocks (and no two files) are alike and nothing is sparse or
compressible, yet generation runs at disk speed rather than at the speed of
the kernel's random generator.  Each file is written to ``NAME.part``,
fsynced and renamed, so a folder kept with ``--data-dir`` never holds a
half-written file under its final name and later runs reuse what is there.
"""

import json
import os

BLOCK = 16 * 1024 * 1024


def make_big_file(path: str, size: int, salt: int) -> bool:
    """Create `path` with `size` bytes unless it is already there; True if written now."""
    try:
        if os.path.getsize(path) == size:
            return False
    except OSError:
        pass
    seed = os.urandom(BLOCK)
    part = path + ".part"
    fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        try:
            os.posix_fallocate(fd, 0, size)  # one extent up front; fewer metadata updates later
        except OSError:
            pass
        written, block = 0, 0
        while written < size:
            k = ((block * 7919 + salt * 104729) * 4096) % BLOCK
            chunk = seed[k:] + seed[:k]
            n = min(BLOCK, size - written)
            view = memoryview(chunk)[:n]
            while view:
                m = os.write(fd, view)
                view = view[m:]
            written += n
            block += 1
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(part, path)
    return True


def config_json(size: int = 700) -> bytes:
    """A model config.json of exactly `size` bytes (the kind of small file clients ask for first)."""
    doc = {
        "_name_or_path": "bench/tiny-bert",
        "architectures": ["BertModel"],
        "attention_probs_dropout_prob": 0.1,
        "classifier_dropout": None,
        "gradient_checkpointing": False,
        "hidden_act": "gelu",
        "hidden_dropout_prob": 0.1,
        "hidden_size": 384,
        "initializer_range": 0.02,
        "intermediate_size": 1536,
        "layer_norm_eps": 1e-12,
        "max_position_embeddings": 512,
        "model_type": "bert",
        "num_attention_heads": 12,
        "num_hidden_layers": 6,
        "pad_token_id": 0,
        "position_embedding_type": "absolute",
        "torch_dtype": "float32",
        "transformers_version": "4.38.0",
        "type_vocab_size": 2,
        "use_cache": True,
        "vocab_size": 30522,
    }
    text = json.dumps(doc, indent=2).encode()
    if len(text) > size - 2:
        raise ValueError("the sample config is larger than the size asked for")
    return text[:-1] + b" " * (size - len(text) - 1) + b"}\n"


def write_small(path: str, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
