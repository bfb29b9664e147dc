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

import pytest  # noqa: E402  (after the environment is set)


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory):
    """The README's offline demo, trained once per test session (about 5 minutes on 2 CPU cores).

    Returns the run folder; its `model/` subfolder is the trained model. The shapes set and the
    embedding cache go to a fresh folder, so nothing from an earlier run is reused.
    """
    import train_accelerate

    root = tmp_path_factory.mktemp("demo")
    output_dir = root / "run"
    train_accelerate.main(
        ["--demo", "--output_dir", str(output_dir), "--data_cache_dir", str(root / "cache")]
    )
    return output_dir
