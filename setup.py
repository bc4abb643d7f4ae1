from setuptools import find_packages, setup

setup(
    name="artifact-vault",
    version="0.1.0",
    description="A caching reverse proxy for the Hugging Face Hub, HTTP mirrors and other artifact stores",
    long_description=open("README.rst", encoding="utf-8").read(),
    long_description_content_type="text/x-rst",
    python_requires=">=3.11",
    packages=find_packages(include=["artifact_vault", "artifact_vault.*"]) + ["twisted.plugins"],
    package_data={"twisted": ["plugins/artifact_vault_plugin.py"]},
    install_requires=[
        "twisted>=24.7",
        "treq>=24.9",
        "PyYAML>=6",
        "service-identity>=24",
        # /_vault/metrics: the exposition format and its types, rather than our own writer
        "prometheus_client>=0.20",
    ],
    entry_points={"console_scripts": ["artifact-vault = artifact_vault.cli:main"]},
    extras_require={
        "test": [
            "pytest>=8",
            "pytest-twisted>=1.14",
            "hypothesis>=6",
            # tests/test_examples.py parses README.rst and docs/*.rst
            "docutils>=0.18",
            # The real clients the Hugging Face tests drive (versions the protocol notes were read from).
            "huggingface_hub>=2.4,<3",
            "hf_xet>=1.8,<2",
            "transformers>=5.24,<6",
            "datasets>=5.2,<6",
            # The PyPI tests drive pip (already present) and uv (its Range reads, its Accept header).
            "uv>=0.13.9,<0.14",
        ],
    },
)
