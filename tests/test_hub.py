"""Model card and Hub upload (hub.py), without network: the Hub API is replaced by recording fakes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from unittest import mock

import pytest
from huggingface_hub import ModelCard

from bitnet_a48 import create_model
from bitnet_a48.hub import push_to_hub_with_card, render_model_card, write_model_card
from bitnet_a48.model_card_template import MODEL_CARD_TEMPLATE

REPO_ROOT = Path(__file__).resolve().parents[1]
METRICS = {"validation perplexity": 4.78, "ratio to b1.58": 1.006}


class RecordingApi:
    """Stands for HfApi: records the files (and README text) present when the upload is called."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.repos: list[str] = []
        self.upload_kwargs: dict[str, Any] = {}

    def create_repo(self, repo_id: str, **kwargs: Any) -> SimpleNamespace:
        self.repos.append(repo_id)
        return SimpleNamespace(repo_id=repo_id)

    def create_branch(self, **kwargs: Any) -> None:
        return None

    def upload_folder(self, *, folder_path: str, repo_id: str, **kwargs: Any) -> str:
        self.files = {p.relative_to(folder_path).as_posix(): p.read_bytes()
                      for p in Path(folder_path).rglob("*") if p.is_file()}
        self.upload_kwargs = kwargs
        return f"{repo_id}@commit-0"

    def create_commit(self, *, repo_id: str, operations: list, **kwargs: Any) -> str:
        self.files = {op.path_in_repo: Path(op.path_or_fileobj).read_bytes() for op in operations}
        return f"{repo_id}@commit-0"


def test_card_copies_are_identical_and_fill_every_placeholder(tiny_config_kwargs: dict, tmp_path: Path) -> None:
    assert (REPO_ROOT / "model_card.md").read_text() == MODEL_CARD_TEMPLATE  # the readable copy
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


def test_push_to_hub_takes_transformers_arguments_and_names_unknown_ones(tiny_config_kwargs: dict) -> None:
    model = create_model(**tiny_config_kwargs)
    api = RecordingApi()
    model.push_to_hub("someone/tiny-a48", metrics=METRICS, api=api, max_shard_size="100KB", safe_serialization=True,
                      commit_message="first", commit_description="tiny", private=True, token="t", tags=["demo"],
                      model_name="tiny-a48", data="Shakespeare bytes")
    assert "model.safetensors.index.json" in api.files  # max_shard_size reached save_pretrained
    assert len([f for f in api.files if f.endswith(".safetensors")]) > 1
    assert api.upload_kwargs["commit_message"] == "first" and api.upload_kwargs["commit_description"] == "tiny"
    readme = api.files["README.md"].decode()
    assert "# tiny-a48" in readme and "Shakespeare bytes" in readme
    card = ModelCard(readme)
    assert {"demo", "bitnet-a4.8"} <= set(card.data.tags) and card.data.library_name == "transformers"

    api = RecordingApi()
    with pytest.raises(TypeError, match="'max_shard_sise'.*'recepe'"):
        model.push_to_hub("someone/tiny-a48", api=api, max_shard_sise="1GB", recepe="typos")
    assert api.repos == [] and api.files == {}  # refused before anything was created
    with pytest.raises(ValueError, match="safetensors"):
        model.push_to_hub("someone/tiny-a48", api=api, safe_serialization=False)


def test_push_to_hub_after_a_remote_code_load(tiny_config_kwargs: dict, tmp_path: Path) -> None:
    # trust_remote_code copies only the .py files into transformers' modules cache, where this package is absent.
    create_model(**tiny_config_kwargs).save_pretrained(tmp_path / "saved")
    script = textwrap.dedent(f"""
        import json, sys
        from pathlib import Path
        from types import SimpleNamespace
        sys.modules["bitnet_a48"] = None  # the package cannot be imported here, as on a machine without it
        from transformers import AutoModelForCausalLM

        class Api:
            def create_repo(self, repo_id, **kwargs):
                return SimpleNamespace(repo_id=repo_id)

            def upload_folder(self, *, folder_path, repo_id, **kwargs):
                self.files = {{p.name: p.read_text(errors="replace") for p in Path(folder_path).iterdir()}}

        model = AutoModelForCausalLM.from_pretrained({str(tmp_path / "saved")!r}, trust_remote_code=True)
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        api = Api()
        model.push_to_hub("someone/tiny-a48", metrics={{"validation perplexity": 4.78}}, api=api, max_shard_size="5GB")
        print(json.dumps({{"files": sorted(api.files), "readme": api.files["README.md"]}}))
    """)
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"))
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    pushed = json.loads(result.stdout.strip().splitlines()[-1])
    assert {"config.json", "model.safetensors", "modeling_bitnet_a48.py", "model_card_template.py"} <= set(
        pushed["files"])
    assert "BitNet a4.8 language model" in pushed["readme"] and "| validation perplexity | 4.78 |" in pushed["readme"]
