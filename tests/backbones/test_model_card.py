"""Model cards of `wadi export` (every format) and `--push-to-hub` against a stand-in Hub."""

import json
import re
import shutil

import numpy as np
import pytest
import torch
import yaml

from wadi import lorad
from wadi.backbones import load_backbone
from wadi.backbones.model_card import hub_id_of, read_scores, write_model_card
from wadi.cli import main
from wadi.eval.generate import model_fingerprint
from wadi.testing import attach_random_adapter


@pytest.fixture(scope="module")
def adapter_dir(sd_dir, tmp_path_factory):
    b = load_backbone(sd_dir, load_text_encoder=False)
    attach_random_adapter(b.denoiser, b.student_preset, rank=2, seed=5)
    return lorad.save_adapter(b.denoiser, tmp_path_factory.mktemp("adapter"), "student")


@pytest.fixture(scope="module")
def exported(sd_dir, adapter_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("exports") / "student"
    assert main(["export", "--teacher", str(sd_dir), "--adapter", str(adapter_dir),
                 "--out", str(out)]) == 0  # fmt: skip
    return out


def _front_matter(text):
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


def _python_block(text):
    return re.search(r"```python\n(.*?)```", text, re.S).group(1)


def _scores_file(path, model_sha256, fid=12.5):
    record = {
        "wadi": "0",
        "date_utc": "2026-12-01T12:00:00Z",
        "num_images": 40,
        "protocol": {"name": "toy-digits"},
        "extractor": {"name": "digits"},
        "results": {"fid": fid, "clip_score": 0.31},
        "generation": {"model": "/somewhere/student", "model_sha256": model_sha256,
                       "steps": 1, "guidance": 0.0, "resolution": 16, "dtype": "float32"},
    }  # fmt: skip
    path.write_text(json.dumps(record))
    return path


def test_folder_card_has_diffusers_metadata_and_a_snippet_that_runs(exported):
    text = (exported / "README.md").read_text()
    meta = _front_matter(text)
    assert meta["library_name"] == "diffusers"
    assert meta["pipeline_tag"] == "text-to-image"
    assert {"text-to-image", "diffusers", "wadi", "lorad", "one-step"} <= set(meta["tags"])
    assert "base_model" not in meta  # a local teacher has no Hub id
    call = json.loads((exported / "wadi_export.json").read_text())["pipeline_call"]
    assert "num_inference_steps=1, guidance_scale=1.0" in text and call["num_inference_steps"] == 1
    assert "| `student_rank` | 2 |" in text  # the recipe, from the adapter
    assert str(exported.parent) not in text.replace(str(exported), "")  # no other local paths
    code = _python_block(text)
    assert code.count("\n") <= 4  # import, blank, load, call
    scope = {}
    exec(code, scope)  # the card's own snippet loads the folder and samples one image
    assert scope["image"].size == (16, 16)


def test_scores_go_into_the_card_and_the_card_is_not_the_model(
    sd_dir, adapter_dir, exported, tmp_path
):
    before = model_fingerprint(exported)
    scores = _scores_file(tmp_path / "scores.json", before)
    again = tmp_path / "again"  # the same student exported again, now with its numbers
    assert main(["export", "--teacher", str(sd_dir), "--adapter", str(adapter_dir),
                 "--out", str(again), "--scores", str(scores)]) == 0  # fmt: skip
    text = (again / "README.md").read_text()
    assert "| FD (digits features) | 12.5 | 40 | toy-digits | 1 |" in text
    assert "these weights" in text  # same fingerprint: the card and scores files are skipped
    assert model_fingerprint(again) == before
    other = _scores_file(tmp_path / "other.json", "0" * 64, fid=20.0)
    write_model_card(again, scores=[other])  # a later refresh keeps the first numbers
    text = (again / "README.md").read_text()
    assert "| 12.5 |" in text and "| 20 |" in text and "(another export)" in text
    assert len(json.loads((again / "wadi_scores.json").read_text())) == 2


def test_eval_score_model_card_updates_the_folder_its_images_came_from(exported, tmp_path):
    from wadi.backbones.model_card import update_card_from_scores

    folder = tmp_path / "student"
    shutil.copytree(exported, folder, symlinks=True)
    scores = _scores_file(tmp_path / "scores.json", model_fingerprint(folder), fid=7.25)
    record = json.loads(scores.read_text())
    record["generation"]["model"] = str(folder)
    scores.write_text(json.dumps(record))
    assert update_card_from_scores(scores) == folder / "README.md"
    assert "| FD (digits features) | 7.25 |" in (folder / "README.md").read_text()
    assert "these weights" in (folder / "README.md").read_text()
    info = json.loads((folder / "wadi_export.json").read_text())
    (folder / "wadi_export.json").write_text(json.dumps({**info, "timesteps": [500]}))
    with pytest.raises(ValueError, match="changed since its images were generated"):
        update_card_from_scores(scores)
    record["generation"]["model"] = str(tmp_path)
    scores.write_text(json.dumps(record))
    with pytest.raises(ValueError, match="not a `wadi export` folder"):
        update_card_from_scores(scores)


@pytest.mark.parametrize(
    "content,expected",
    [
        (None, "not found"),
        ("{", "not valid JSON"),
        ('{"results": {"fid": 1.0}}', "does not record which model"),
        ('{"results": {}, "generation": {"model_sha256": "x"}}', "holds no results"),
    ],
)
def test_bad_scores_file_is_one_line_before_any_export(
    sd_dir, adapter_dir, tmp_path, capsys, content, expected
):
    scores = tmp_path / "scores.json"
    if content is not None:
        scores.write_text(content)
    out = tmp_path / "out"
    assert main(["export", "--teacher", str(sd_dir), "--adapter", str(adapter_dir),
                 "--out", str(out), "--scores", str(scores)]) == 2  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert expected in err and len(err.splitlines()) == 1
    assert not out.exists()
    with pytest.raises((ValueError, FileNotFoundError), match=expected):
        read_scores(scores)


def test_base_model_comes_from_the_hub_cache_or_the_flag(sd_dir, adapter_dir, tmp_path, capsys):
    snapshot = tmp_path / "hub" / "models--acme--tiny-sd" / "snapshots" / "0123abc"
    assert hub_id_of(snapshot) == "acme/tiny-sd"
    assert hub_id_of(sd_dir) is None
    snapshot.parent.mkdir(parents=True)
    snapshot.symlink_to(sd_dir)
    out = tmp_path / "out"
    assert main(["export", "--teacher", str(snapshot), "--adapter", str(adapter_dir),
                 "--out", str(out)]) == 0  # fmt: skip
    assert _front_matter((out / "README.md").read_text())["base_model"] == "acme/tiny-sd"
    assert main(["export", "--teacher", str(sd_dir), "--adapter", str(adapter_dir),
                 "--out", str(tmp_path / "o2"), "--base-model", "not a repo"]) == 2  # fmt: skip
    err = capsys.readouterr().err
    assert "--base-model 'not a repo' is not a Hub repo id" in err
    assert not (tmp_path / "o2").exists()


class FakeHub:
    """Stands in for ``huggingface_hub.HfApi``: records calls, copies uploads to a folder."""

    calls: list = []
    root = None

    def __init__(self, token=None, **_):
        self.token = token

    def create_repo(self, repo_id, *, private=None, exist_ok=False, token=None, **_):
        FakeHub.calls.append(("create_repo", repo_id, private, exist_ok, token))
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, *, repo_id, folder_path, token=None, **_):
        FakeHub.calls.append(("upload_folder", repo_id, token))
        shutil.copytree(folder_path, FakeHub.root / repo_id, dirs_exist_ok=True)

    def create_commit(self, *, repo_id, operations, token=None, **_):
        FakeHub.calls.append(("create_commit", repo_id, token))
        for op in operations:
            target = FakeHub.root / repo_id / op.path_in_repo
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(op.path_or_fileobj, target)


@pytest.fixture
def hub(tmp_path, monkeypatch):
    import huggingface_hub

    FakeHub.calls, FakeHub.root = [], tmp_path / "the-hub"
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHub)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_TOKEN", "hf_test")
    return FakeHub


def test_push_to_hub_uploads_the_folder_with_its_card(sd_dir, adapter_dir, tmp_path, hub, capsys):
    out = tmp_path / "student"
    assert main(["export", "--teacher", str(sd_dir), "--adapter", str(adapter_dir), "--out",
                 str(out), "--dtype", "fp16", "--push-to-hub", "acme/student", "--private"]) == 0  # fmt: skip
    assert hub.calls == [
        ("create_repo", "acme/student", True, True, "hf_test"),
        ("upload_folder", "acme/student", "hf_test"),
    ]
    remote = hub.root / "acme" / "student"
    assert sorted(p.name for p in remote.iterdir()) == sorted(p.name for p in out.iterdir())
    card = (remote / "README.md").read_text()
    assert 'from_pretrained("acme/student", torch_dtype=torch.float16, variant="fp16")' in card
    assert card == (out / "README.md").read_text()  # the local card names the repo too
    write_model_card(out)  # and a rewrite (new scores) keeps it
    assert 'from_pretrained("acme/student"' in (out / "README.md").read_text()
    assert (remote / "unet" / "diffusion_pytorch_model.fp16.safetensors").is_file()
    assert "uploaded to https://huggingface.co/acme/student" in capsys.readouterr().out


@pytest.mark.parametrize("fmt", ["single-file", "lora"])
def test_file_formats_push_the_file_with_its_card(
    sd_dir, adapter_dir, exported, tmp_path, hub, monkeypatch, fmt
):
    out = tmp_path / "student.safetensors"
    assert main(["export", "--teacher", str(sd_dir), "--adapter", str(adapter_dir), "--out",
                 str(out), "--format", fmt, "--push-to-hub", "acme/student"]) == 0  # fmt: skip
    remote = hub.root / "acme" / "student"
    names = sorted(p.name for p in remote.iterdir())
    extra = ["student.scheduler.json"] if fmt == "single-file" else []
    assert names == sorted(["README.md", "student.safetensors", *extra])
    card = (remote / "README.md").read_text()
    assert card == (tmp_path / "student.md").read_text()  # the local card, uploaded as README
    meta = _front_matter(card)
    assert meta["library_name"] == "diffusers" and ("lora" in meta["tags"]) == (fmt == "lora")
    assert ("from_single_file" in card) == (fmt == "single-file")
    assert ('load_lora_weights("acme/student"' in card) == (fmt == "lora")
    assert not list(tmp_path.glob(".*")), "staging folder left behind"
    # the card's snippet, run on the downloaded files, samples what the student folder does
    code = _python_block(card).replace("TEACHER_DIR", str(sd_dir))
    code = code.replace('"acme/student"', '"."')
    monkeypatch.chdir(remote)
    scope = {}
    torch.manual_seed(0)
    exec(code, scope)
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(exported)
    torch.manual_seed(0)
    want = pipe("a photo of a cat", num_inference_steps=1, guidance_scale=1.0).images[0]
    got = np.asarray(scope["image"], dtype=int)
    assert np.abs(got - np.asarray(want, dtype=int)).max() <= 1


def test_push_offline_or_without_token_is_one_line_and_keeps_the_export(
    exported, tmp_path, monkeypatch, hub, capsys
):
    import huggingface_hub

    from wadi.backbones.model_card import push_to_hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match=r"HF_HUB_OFFLINE is set.*hf upload acme/x"):
        push_to_hub([exported], "acme/x")
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("HF_TOKEN")
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    with pytest.raises(ValueError, match="no Hugging Face token; set HF_TOKEN, pass --token"):
        push_to_hub([exported], "acme/x")
    with pytest.raises(ValueError, match="not a Hub repo id"):
        push_to_hub([exported], "../x")
    assert hub.calls == [] and (exported / "README.md").is_file()


def test_push_failure_after_export_keeps_the_local_folder(
    sd_dir, adapter_dir, tmp_path, hub, monkeypatch, capsys
):
    def refuse(self, **_):
        raise ConnectionError("no route to host")

    monkeypatch.setattr(FakeHub, "upload_folder", refuse)
    out = tmp_path / "student"
    assert main(["export", "--teacher", str(sd_dir), "--adapter", str(adapter_dir), "--out",
                 str(out), "--push-to-hub", "acme/student"]) == 2  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert "cannot reach the Hub" in err and str(out) in err and len(err.splitlines()) == 1
    assert (out / "README.md").is_file() and (out / "unet").is_dir()
    assert json.loads((out / "model_index.json").read_text())["_class_name"]


def test_pixel_space_card_says_how_wadi_loads_it(pixel_dir, tmp_path):
    from wadi.backbones.export import save_pipeline

    b = load_backbone(pixel_dir)
    folder = save_pipeline(b, b.denoiser, tmp_path / "pixel")
    text = write_model_card(folder, recipe={"adapter": "lorad"}).read_text()
    assert f'wadi generate --pipeline {folder} --prompt "a photo of a cat"' in text
    assert "from_pretrained" not in text  # the stock pipelines need a VAE
    assert _front_matter(text)["library_name"] == "diffusers"


def test_hub_flags_are_checked_before_the_export(sd_dir, adapter_dir, tmp_path, capsys):
    out = tmp_path / "out"
    base = ["export", "--teacher", str(sd_dir), "--adapter", str(adapter_dir), "--out", str(out)]
    assert main([*base, "--private"]) == 2
    assert "--private and --token go with --push-to-hub" in capsys.readouterr().err
    assert main([*base, "--push-to-hub", "no-slash"]) == 2
    assert "--push-to-hub 'no-slash' is not a Hub repo id" in capsys.readouterr().err
    assert not out.exists()


def test_eval_score_model_card_needs_a_generation_record(tmp_path, capsys):
    images = tmp_path / "images"
    images.mkdir()
    captions = tmp_path / "captions.txt"
    captions.write_text("a\n")
    assert main(["eval", "score", "--images", str(images), "--captions", str(captions),
                 "--metrics", "clip", "--model-card"]) == 2  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert "--model-card needs" in err and "generation.json" in err and len(err.splitlines()) == 1
