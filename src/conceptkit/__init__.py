"""conceptkit: personalized text-to-image generation (Textual Inversion, CLoRA, ProFusion) on latent diffusion models."""
import os

# conceptkit never reaches the network: models come from local folders, files or the local Hugging Face cache.
for _var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE", "HF_HUB_DISABLE_TELEMETRY",
             "DISABLE_TELEMETRY"):
    os.environ.setdefault(_var, "1")

__version__ = "0.1.0"
