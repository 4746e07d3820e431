"""Model card and Hub upload (hub.py), without network: the Hub API is replaced by recording fakes."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any
from unittest import mock

from huggingface_hub import ModelCard

from bitnet_a48 import create_model
from bitnet_a48.hub import push_to_hub_with_card, render_model_card, write_model_card

REPO_ROOT = Path(__file__).resolve().parents[1]
METRICS = {"validation perplexity": 4.78, "ratio to b1.58": 1.006}


class RecordingApi:
    """Stands for HfApi: records the files (and README text) present when the upload is called."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}

    def create_repo(self, repo_id: str, **kwargs: Any) -> SimpleNamespace:
        return SimpleNamespace(repo_id=repo_id)

    def create_branch(self, **kwargs: Any) -> None:
        return None

    def upload_folder(self, *, folder_path: str, repo_id: str, **kwargs: Any) -> str:
        self.files = {p.relative_to(folder_path).as_posix(): p.read_bytes()
                      for p in Path(folder_path).rglob("*") if p.is_file()}
        return f"{repo_id}@commit-0"

    def create_commit(self, *, repo_id: str, operations: list, **kwargs: Any) -> str:
        self.files = {op.path_in_repo: Path(op.path_or_fileobj).read_bytes() for op in operations}
        return f"{repo_id}@commit-0"


def test_card_copies_are_identical_and_fill_every_placeholder(tiny_config_kwargs: dict, tmp_path: Path) -> None:
    shipped = (REPO_ROOT / "src" / "bitnet_a48" / "model_card.md").read_text()
    assert (REPO_ROOT / "model_card.md").read_text() == shipped
    model = create_model(**tiny_config_kwargs)
    path = write_model_card(model, tmp_path, METRICS, recipe={"stage 1 (a8) steps": 570, "stage 2 (a4.8) steps": 30},
                            data="Shakespeare bytes", model_name="tiny-a48")
    text = path.read_text()
    assert "${" not in text and "# tiny-a48" in text
    assert "| validation perplexity | 4.78 |" in text and "- stage 2 (a4.8) steps: 30" in text
    assert "| layers / hidden / FFN | 2 / 64 / 160 |" in text and "| 4 / 2 / 16 |" in text
    card = ModelCard.load(path)  # the YAML header parses
    assert card.data.library_name == "transformers" and "bitnet-a4.8" in card.data.tags
    assert "_Not measured._" in render_model_card(model)


def test_model_push_to_hub_uploads_our_card(tiny_config_kwargs: dict) -> None:
    # transformers' push_to_hub (5.x) saves, then writes its generic card over README.md; ours uploads our card.
    model = create_model(**tiny_config_kwargs)
    api = RecordingApi()
    with mock.patch("huggingface_hub.HfApi", return_value=api):
        model.push_to_hub("someone/tiny-a48", metrics=METRICS)
    readme = api.files["README.md"].decode()
    assert "BitNet a4.8 language model" in readme and "| validation perplexity | 4.78 |" in readme
    assert {"config.json", "model.safetensors", "modeling_bitnet_a48.py"} <= set(api.files)


def test_push_to_hub_with_card_uploads_our_card(tiny_config_kwargs: dict) -> None:
    model = create_model(**tiny_config_kwargs)
    api = RecordingApi()
    push_to_hub_with_card(model, "someone/tiny-a48", METRICS, api=api)
    readme = api.files["README.md"].decode()
    assert "BitNet a4.8 language model" in readme and 'from_pretrained("someone/tiny-a48"' in readme
    assert {"config.json", "model.safetensors", "modeling_bitnet_a48.py"} <= set(api.files)
