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
    install_requires=["twisted>=24.7", "treq>=24.9", "PyYAML>=6", "service-identity>=24"],
    extras_require={
        "test": [
            "pytest>=8",
            "pytest-twisted>=1.14",
            "huggingface_hub>=1.0",
            "hf_xet",
            "transformers",
            "datasets",
        ],
    },
)
