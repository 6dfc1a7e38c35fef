"""Offline tests for scripts/download.py: every hub call is replaced by a fake."""

from __future__ import annotations

import json
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import scripts.download as dl  # noqa: E402


class FakeHub:
    """Records hub calls and writes plausible files where the real hub would."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict]] = []

    def snapshot_download(self, **kwargs) -> str:
        self.calls.append(("snapshot_download", kwargs))
        local = Path(kwargs["local_dir"])
        local.mkdir(parents=True, exist_ok=True)
        if kwargs["repo_id"] == dl.CLIP_REPO:
            (local / "config.json").write_text("{}")
            (local / "model.safetensors").write_bytes(b"x")
        elif kwargs["repo_id"] == dl.DATASET_REPO:  # only eval_images/ is fetched as a folder
            (local / "eval_images").mkdir(exist_ok=True)
            (local / "eval_images" / "cat.png").write_bytes(b"png")
        elif kwargs["repo_id"] in dl.MODEL_REPOS.values():
            (local / "config.json").write_text("{}")
            (local / "pytorch_model.bin").write_bytes(b"x")
        return str(local)

    def hf_hub_download(self, **kwargs) -> str:
        self.calls.append(("hf_hub_download", kwargs))
        path = Path(kwargs["local_dir"]) / kwargs["filename"]
        path.parent.mkdir(parents=True, exist_ok=True)
        # One zip wraps its files in a same-named folder, the other doesn't:
        # both must end up directly under dataset/<stem>/.
        if kwargs["filename"] == "pretrain_images.zip":
            with zipfile.ZipFile(path, "w") as z:
                z.writestr("pretrain_images/a.jpg", b"jpg-a")
        elif kwargs["filename"] == "sft_images.zip":
            with zipfile.ZipFile(path, "w") as z:
                z.writestr("b.jpg", b"jpg-b")
        else:
            path.write_bytes(b"weights")
        return str(path)


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch) -> FakeHub:
    fake = FakeHub()
    monkeypatch.setattr(dl, "snapshot_download", fake.snapshot_download)
    monkeypatch.setattr(dl, "hf_hub_download", fake.hf_hub_download)
    monkeypatch.delenv("HF_ENDPOINT", raising=False)
    return fake


def test_clip(hub: FakeHub, tmp_path: Path) -> None:
    dl.main(["--what", "clip", "--root", str(tmp_path)])
    assert len(hub.calls) == 1  # safetensors present -> no pytorch_model.bin fallback
    fn, kw = hub.calls[0]
    assert fn == "snapshot_download"
    assert kw["repo_id"] == "openai/clip-vit-base-patch32"
    assert kw["repo_type"] == "model"
    assert Path(kw["local_dir"]) == tmp_path / "model/clip_model/clip-vit-base-patch32"


def test_clip_falls_back_to_bin(hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def snapshot_without_safetensors(**kwargs) -> str:
        hub.calls.append(("snapshot_download", kwargs))
        Path(kwargs["local_dir"]).mkdir(parents=True, exist_ok=True)
        return kwargs["local_dir"]

    monkeypatch.setattr(dl, "snapshot_download", snapshot_without_safetensors)
    dl.download_clip(tmp_path)
    assert [c[0] for c in hub.calls] == ["snapshot_download", "hf_hub_download"]
    assert hub.calls[1][1]["filename"] == "pytorch_model.bin"


V1_REVISION = "dbe331826f7dd6bf9e66d33cb7f4b15fbcb88afe"


def test_dataset_downloads_the_exact_v1_files_and_unzips(hub: FakeHub, tmp_path: Path) -> None:
    dl.main(["--what", "dataset", "--root", str(tmp_path)])
    files = [kw["filename"] for fn, kw in hub.calls if fn == "hf_hub_download"]
    assert files == ["LLaVA-Pretrain/chat-translated.json", "LLaVA-Instruct/llava_instruct_230k.json",
                     "pretrain_images.zip", "sft_images.zip"]
    for _, kw in hub.calls:  # every call pinned to the v1 snapshot, into dataset/
        assert (kw["repo_id"], kw["repo_type"], kw["revision"]) == ("jingyaogong/minimind-v_dataset", "dataset",
                                                                    V1_REVISION)
        assert Path(kw["local_dir"]) == tmp_path / "dataset"
    folders = [kw["allow_patterns"] for fn, kw in hub.calls if fn == "snapshot_download"]
    assert folders == [["eval_images/*"]]
    assert (tmp_path / "dataset/eval_images/cat.png").exists()
    assert (tmp_path / "dataset/LLaVA-Pretrain/chat-translated.json").exists()
    assert (tmp_path / "dataset/pretrain_images/a.jpg").read_bytes() == b"jpg-a"
    assert not (tmp_path / "dataset/pretrain_images/pretrain_images").exists()
    assert (tmp_path / "dataset/sft_images/b.jpg").read_bytes() == b"jpg-b"

    # A re-run skips archives that were already extracted.
    (tmp_path / "dataset/sft_images/b.jpg").unlink()
    dl.extract_zip(tmp_path / "dataset/sft_images.zip", tmp_path / "dataset")
    assert not (tmp_path / "dataset/sft_images/b.jpg").exists()


def test_revision_can_be_overridden(hub: FakeHub, tmp_path: Path) -> None:
    dl.main(["--what", "eval_images", "llm", "--revision", "main", "--root", str(tmp_path)])
    assert [kw["revision"] for _, kw in hub.calls] == ["main", "main"]
    assert (tmp_path / "dataset/eval_images/cat.png").exists()


@pytest.mark.parametrize("dim, repo", [(512, "jingyaogong/minimind-v-v1-small"), (768, "jingyaogong/minimind-v-v1")])
def test_model_goes_into_the_project_root_without_its_code(hub: FakeHub, tmp_path: Path, dim: int,
                                                           repo: str) -> None:
    dl.main(["--what", "model", "--dim", str(dim), "--root", str(tmp_path)])
    [(fn, kw)] = hub.calls
    assert (fn, kw["repo_id"], kw["repo_type"]) == ("snapshot_download", repo, "model")
    assert Path(kw["local_dir"]) == tmp_path / repo.split("/")[1]
    assert "*.py" in kw["ignore_patterns"]


def test_zip_slip_is_refused(tmp_path: Path) -> None:
    bad = tmp_path / "evil.zip"
    with zipfile.ZipFile(bad, "w") as z:
        z.writestr("../outside.txt", b"x")
    with pytest.raises(dl.DownloadError):
        dl.extract_zip(bad, tmp_path / "dataset")
    assert not (tmp_path / "outside.txt").exists()


@pytest.mark.parametrize("dim", [512, 768])
def test_llm(hub: FakeHub, tmp_path: Path, dim: int) -> None:
    dl.main(["--what", "llm", "--dim", str(dim), "--root", str(tmp_path)])
    fn, kw = hub.calls[0]
    assert fn == "hf_hub_download"
    assert (kw["repo_id"], kw["repo_type"], kw["filename"]) == (dl.DATASET_REPO, "dataset", f"out/{dim}_llm.pth")
    assert kw["revision"] == V1_REVISION
    assert (tmp_path / f"out/{dim}_llm.pth").exists()


def test_tokenizer(hub: FakeHub, tmp_path: Path) -> None:
    dl.main(["--what", "tokenizer", "--root", str(tmp_path)])
    assert {kw["filename"] for _, kw in hub.calls} == {"tokenizer.json", "tokenizer_config.json"}
    for _, kw in hub.calls:
        assert kw["repo_id"] == "jingyaogong/minimind-v-v1-small"
        assert kw["repo_type"] == "model"
        assert Path(kw["local_dir"]) == tmp_path / "model/minimind_tokenizer_official"


def test_all_fetches_every_piece(hub: FakeHub, tmp_path: Path) -> None:
    dl.main(["--what", "all", "--root", str(tmp_path)])
    repos = {kw["repo_id"] for _, kw in hub.calls}
    assert repos == {dl.CLIP_REPO, dl.DATASET_REPO, dl.TOKENIZER_REPO}
    assert any(kw.get("filename") == "out/512_llm.pth" for _, kw in hub.calls)


def test_endpoint_is_reported_and_used(
    hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.setenv("HF_ENDPOINT", "https://hf-mirror.com")
    dl.main(["--what", "tokenizer", "--root", str(tmp_path)])
    assert "https://hf-mirror.com" in capsys.readouterr().out
    assert all(kw["endpoint"] == "https://hf-mirror.com" for _, kw in hub.calls)


def test_network_error_becomes_one_line_exit(
    hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def offline(**kwargs):
        raise ConnectionError("Failed to resolve 'huggingface.co'\nmore traceback-ish detail")

    monkeypatch.setattr(dl, "snapshot_download", offline)
    with pytest.raises(SystemExit) as excinfo:
        dl.main(["--what", "clip", "--root", str(tmp_path)])
    message = str(excinfo.value.code)
    assert "\n" not in message
    assert "openai/clip-vit-base-patch32" in message
    assert "ConnectionError" in message
    assert "HF_ENDPOINT=https://hf-mirror.com" in message


BENCH_PINS = {"lmms-lab/POPE": "4db1276663dfa5eb8ad16a52d24c31a09e470896",
              "Lin-Chen/MMStar": "bc98d668301da7b14f648724866e57302778ab27"}


def test_bench_fetches_the_pinned_parquet_files_and_records_the_revision(hub: FakeHub, tmp_path: Path) -> None:
    dl.main(["--what", "bench", "--revision", "main", "--root", str(tmp_path)])  # --revision is the v1 dataset's
    files = [(kw["repo_id"], kw["filename"]) for fn, kw in hub.calls if fn == "hf_hub_download"]
    assert files == [("lmms-lab/POPE", f"data/test-0000{i}-of-00003.parquet") for i in range(3)] + \
        [("Lin-Chen/MMStar", "mmstar.parquet")]
    for _, kw in hub.calls:
        assert kw["repo_type"] == "dataset" and kw["revision"] == BENCH_PINS[kw["repo_id"]]
    assert (tmp_path / "dataset/bench/pope/data/test-00002-of-00003.parquet").exists()
    assert (tmp_path / "dataset/bench/mmstar/mmstar.parquet").exists()
    manifest = json.loads((tmp_path / "dataset/bench/pope/bench_source.json").read_text())
    assert manifest == {"benchmark": "pope", "repo": "lmms-lab/POPE", "revision": BENCH_PINS["lmms-lab/POPE"],
                        "files": [f"data/test-0000{i}-of-00003.parquet" for i in range(3)]}


def test_all_does_not_fetch_the_benchmarks(hub: FakeHub, tmp_path: Path) -> None:
    dl.main(["--what", "all", "--root", str(tmp_path)])
    assert not {kw["repo_id"] for _, kw in hub.calls} & set(BENCH_PINS)
    assert not (tmp_path / "dataset/bench").exists()


def test_a_failed_bench_download_is_one_line_and_writes_no_manifest(
    hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def offline(**kwargs):
        raise ConnectionError("Failed to resolve 'huggingface.co'\ndetail")

    monkeypatch.setattr(dl, "hf_hub_download", offline)
    with pytest.raises(SystemExit) as excinfo:
        dl.main(["--what", "bench", "--root", str(tmp_path)])
    message = str(excinfo.value.code)
    assert "\n" not in message and "lmms-lab/POPE/data/test-00000-of-00003.parquet" in message
    assert not (tmp_path / "dataset/bench/pope/bench_source.json").exists()


def test_generation_3v_fetches_minimind_3v_files(hub: FakeHub, tmp_path: Path) -> None:
    dl.main(["--what", "model", "clip", "eval_images", "llm", "tokenizer", "--generation", "3v",
             "--root", str(tmp_path)])
    got = [(fn, kw["repo_id"], kw.get("filename"), Path(kw["local_dir"])) for fn, kw in hub.calls]
    assert got == [
        ("snapshot_download", "jingyaogong/minimind-3v", None, tmp_path / "minimind-3v"),
        ("snapshot_download", "jingyaogong/siglip2-base-p32-256-ve", None, tmp_path / "model/siglip2-base-p32-256-ve"),
        ("snapshot_download", dl.DATASET_REPO, None, tmp_path / "dataset"),
        ("hf_hub_download", "jingyaogong/minimind-3v-pytorch", "llm_768.pth", tmp_path / "out"),
        ("hf_hub_download", "jingyaogong/minimind-3v", "tokenizer.json",
         tmp_path / "model/minimind_3v_tokenizer_official"),  # the project's own 3v tokenizer is not overwritten
        ("hf_hub_download", "jingyaogong/minimind-3v", "tokenizer_config.json",
         tmp_path / "model/minimind_3v_tokenizer_official"),
    ]
    assert all("*.py" in kw["ignore_patterns"] for fn, kw in hub.calls if fn == "snapshot_download")
    assert "revision" not in hub.calls[2][1]  # 3v's eval images: the dataset repo's main branch, not v1's snapshot
    assert (tmp_path / "out" / "llm_768.pth").exists()
