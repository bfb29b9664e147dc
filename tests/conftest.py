"""Test-wide settings: nothing in the suite may reach the network.

These machines have no route to the Hugging Face Hub; offline mode makes the libraries fail
at once instead of retrying for ~20 s, and keeps gradio and the Hub client from calling home.
Set before any test module imports huggingface_hub, which reads them at import.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
