from twisted.application.service import ServiceMaker

artifactVault = ServiceMaker(
    "Artifact Vault",
    "artifact_vault.tap",
    "A caching reverse proxy for the Hugging Face Hub and other artifact stores.",
    "artifact-vault",
)
