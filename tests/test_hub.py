"""pretrained=True resolves weights as timm does, offline: an explicit file, then $INTERN2_HOME, then the Hugging
Face cache (a cache the test builds in the Hub's layout; HF_HUB_OFFLINE=1 is set for every test by conftest)."""
from __future__ import annotations

import json

import pytest
import torch

import intern2
from intern2 import cli
from conftest import hub_path
from intern2.hub import resolve_weights

TINY = dict(channels=16, depths=[1, 1, 1, 1], groups=[1, 2, 4, 8], drop_path_rate=0.0)
def _outputs_equal(a, b):
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        return torch.equal(a.eval()(x), b.eval()(x))


@pytest.fixture
def reference():
    return intern2.create_model("internimage_t", **TINY).eval()


def test_pretrained_reads_the_hub_cache(tmp_path, reference, monkeypatch):
    monkeypatch.setenv("INTERN2_HOME", str(tmp_path / "empty_home"))
    path = hub_path(tmp_path, "OpenGVLab/InternImage", "internimage_t_1k_224.pth")
    torch.save({"model": reference.state_dict()}, path)
    model = intern2.create_model("internimage_t.in1k", pretrained=True, cache_dir=tmp_path, **TINY)
    assert _outputs_equal(model, reference)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))  # the default cache, as timm users have it
    timm = pytest.importorskip("timm")
    assert _outputs_equal(timm.create_model("internimage_t.in1k", pretrained=True, **TINY), reference)


def test_missing_weights_say_which_repo_and_file_to_fetch(tmp_path, monkeypatch):
    monkeypatch.setenv("INTERN2_HOME", str(tmp_path / "home"))
    with pytest.raises(FileNotFoundError) as error:
        intern2.create_model("internimage_s", pretrained=True, cache_dir=tmp_path, **TINY)
    message = str(error.value)
    assert "internimage_s.in1k: internimage_s_1k_224.pth of OpenGVLab/InternImage is not in the Hugging Face " \
           "cache" in message and "HF_HUB_OFFLINE=1" in message
    # The command given fetches into the cache that was searched.
    assert f"`hf download OpenGVLab/InternImage internimage_s_1k_224.pth --cache-dir {tmp_path}`" in message
    assert f"cache ({tmp_path})" in message and "\n" not in message
    with pytest.raises(FileNotFoundError, match="vit_b_hybrid_pt_800e_k400_ft.pth are not at .*published at "
                                                "https://pjlab-gvm-data"):
        resolve_weights(intern2.weights.get_weights("videomae_vit_b", "internvideo_k400").pretrained_cfg())
    with pytest.raises(ValueError, match="unknown pretrained tag 'in21k' for internimage_t; known: \\['in1k'\\]"):
        intern2.create_model("internimage_t.in21k")


def test_an_explicit_file_then_intern2_home_win_over_the_cache(tmp_path, reference, monkeypatch):
    other = intern2.create_model("internimage_t", **TINY).eval()
    torch.save({"model": other.state_dict()}, hub_path(tmp_path, "OpenGVLab/InternImage", "internimage_t_1k_224.pth"))
    (tmp_path / "home").mkdir()
    torch.save({"model": reference.state_dict()}, tmp_path / "home" / "internimage_t_1k_224.pth")
    monkeypatch.setenv("INTERN2_HOME", str(tmp_path / "home"))
    assert _outputs_equal(intern2.create_model("internimage_t", pretrained=True, cache_dir=tmp_path, **TINY),
                          reference)
    explicit = tmp_path / "mine.pth"
    torch.save(other.state_dict(), explicit)
    model = intern2.create_model("internimage_t", pretrained=True, cache_dir=tmp_path,
                                 pretrained_cfg_overlay=dict(file=str(explicit)), **TINY)
    assert _outputs_equal(model, other)


def test_a_file_of_the_published_name_in_the_current_folder_is_not_read(tmp_path, reference, monkeypatch):
    """timm's keys: the published name is ``hf_hub_filename``; only ``file`` is a local path."""
    torch.save({"model": reference.state_dict()}, hub_path(tmp_path, "OpenGVLab/InternImage",
                                                           "internimage_t_1k_224.pth"))
    work = tmp_path / "work"
    (work / "internimage_t_1k_224.pth").mkdir(parents=True)  # not a checkpoint: must not be read
    monkeypatch.chdir(work)
    monkeypatch.setenv("INTERN2_HOME", str(tmp_path / "empty_home"))
    model = intern2.create_model("internimage_t.in1k", pretrained=True, cache_dir=tmp_path, **TINY)
    assert _outputs_equal(model, reference)
    assert model.pretrained_cfg["file"] is None and model.pretrained_cfg["hf_hub_filename"] == \
        "internimage_t_1k_224.pth"


def test_a_damaged_cached_file_is_named(tmp_path, monkeypatch):
    monkeypatch.setenv("INTERN2_HOME", str(tmp_path / "home"))
    path = hub_path(tmp_path, "OpenGVLab/InternImage", "internimage_t_1k_224.pth")
    path.write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(ValueError, match=f"cannot read checkpoint {path}.*damaged download.*delete {path}"):
        intern2.create_model("internimage_t", pretrained=True, cache_dir=tmp_path, **TINY)


def test_a_damaged_file_of_an_hf_hub_repo_is_named(tmp_path, reference, monkeypatch):
    """timm's hf-hub: names read a whole repo folder from the cache: a truncated file there gets the same advice."""
    timm = pytest.importorskip("timm")
    folder = hub_path(tmp_path, "someone/internimage-tiny")
    intern2.save_pretrained(reference, folder)
    (folder / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes()[:1000])
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(ValueError, match="cannot read checkpoint .*model.safetensors.*damaged download"):
        timm.create_model("hf-hub:someone/internimage-tiny", pretrained=True)


def test_a_folder_tag_is_the_repos_snapshot(tmp_path, monkeypatch, capsys):
    """NLLB-200 is an HF folder: `intern2 translate` without --model finds it in the cache."""
    pytest.importorskip("sentencepiece")
    pytest.importorskip("babel")
    from intern2.text.corpus import builtin_sentences
    from intern2.text.tokenizer import NllbTokenizer
    langs = ["eng_Latn", "fra_Latn"]
    tokenizer = NllbTokenizer.train(builtin_sentences(langs), 300, langs)
    model = intern2.create_model("intern2_mt_tiny", vocab_size=tokenizer.vocab_size, encoder_layers=1,
                                 decoder_layers=1)
    folder = hub_path(tmp_path, "facebook/nllb-200-distilled-600M")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("INTERN2_HOME", str(tmp_path / "home"))
    cfg = intern2.weights.get_weights("intern2_mt_600m", "nllb200_distilled").pretrained_cfg()
    assert resolve_weights(cfg) == folder
    assert cli.main(["translate", "--src", "en", "--tgt", "fr", "--max-new-tokens", "4", "Hello."]) == 0
    assert capsys.readouterr().out.count("\n") == 1  # one line per input (a random model may decode </s> first)
    assert cli.main(["translate", "--model", "facebook/nllb-200-distilled-600M", "--src", "en", "--tgt", "fr",
                     "--max-new-tokens", "4", "Hello."]) == 0  # the repo named, as transformers users do
    assert capsys.readouterr().out.count("\n") == 1
    from intern2.pipelines import open_pipeline
    from intern2.pipelines.translation import Translator
    opened = open_pipeline("facebook/nllb-200-distilled-600M")  # the tokenizer comes from the repo's snapshot too
    assert isinstance(opened, Translator) and len(opened.translate(["Hello."], "eng_Latn", "fra_Latn",
                                                                   max_new_tokens=4)) == 1
    # Damaged downloads are named, with what to do.
    weights = (folder / "model.safetensors").read_bytes()
    for damaged, message in (("model.safetensors", "model.safetensors"), ("sentencepiece.bpe.model",
                                                                          "is not a SentencePiece model file")):
        original = (folder / damaged).read_bytes()
        (folder / damaged).write_bytes(original[:1000])
        with pytest.raises(SystemExit) as stop:
            cli.main(["translate", "--src", "en", "--tgt", "fr", "Hello."])
        assert stop.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert message in err and "a damaged download? delete" in err
        (folder / damaged).write_bytes(original)
    assert (folder / "model.safetensors").read_bytes() == weights


def test_hf_hub_names_load_timm_format_repos(tmp_path, reference, monkeypatch):
    """timm's `hf-hub:` names: a repo holding an intern2 (timm-readable) folder."""
    timm = pytest.importorskip("timm")
    folder = hub_path(tmp_path, "someone/internimage-tiny")
    intern2.save_pretrained(reference, folder)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    loaded = timm.create_model("hf-hub:someone/internimage-tiny", pretrained=True)
    assert _outputs_equal(loaded, reference)
    assert json.loads((folder / "config.json").read_text())["architecture"] == "internimage_t"
    assert loaded.pretrained_cfg["hf_hub_id"] == "someone/internimage-tiny"  # not the weights it came from


def test_folders_written_by_timm_load_through_every_door(tmp_path, reference, capsys):
    """timm's own save_for_hf layout (model_args apart, num_features / label_names at the top) for an intern2 model:
    intern2.from_pretrained, timm's local-dir: name and the CLI read it as the model it saved."""
    timm = pytest.importorskip("timm")
    folder = tmp_path / "timm_folder"
    timm.models.save_for_hf(reference, folder, model_args=TINY, safe_serialization=True,
                            model_config={"label_names": [f"class {i}" for i in range(1000)]})
    assert "model_args" in json.loads((folder / "config.json").read_text())
    assert _outputs_equal(intern2.from_pretrained(folder), reference)
    assert _outputs_equal(timm.create_model(f"local-dir:{folder}", pretrained=True), reference)
    assert intern2.from_pretrained(folder).pretrained_cfg["label_names"][3] == "class 3"
    image = tmp_path / "a.png"
    __import__("PIL.Image").Image.new("RGB", (48, 40), (120, 30, 200)).save(image)
    assert cli.main(["predict", str(image), "--checkpoint", str(folder), "--json", "--topk", "1"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["top"][0]["label"].startswith("class ")


@pytest.mark.parametrize("error, message", [("EntryNotFoundError", "the Hub repo OpenGVLab/InternImage has no file "
                                             "internimage_t_1k_224.pth"),
                                            ("RepositoryNotFoundError", "the Hub has no repo OpenGVLab/InternImage"),
                                            ("LocalEntryNotFoundError", "and the Hub could not be reached: fetch it "
                                             "with `hf download OpenGVLab/InternImage internimage_t_1k_224.pth "
                                             "--cache-dir ")])
def test_online_hub_errors_name_the_repo_and_file(error, message, tmp_path, monkeypatch):
    """What the Hub answers when online (simulated: tests never reach the network)."""
    import huggingface_hub
    import huggingface_hub.errors

    def refuse(*args, **kwargs):
        cls = getattr(huggingface_hub.errors, error)
        exc = cls.__new__(cls)  # built without an HTTP response (the HTTP errors want one)
        Exception.__init__(exc, "simulated")
        raise exc
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("INTERN2_HOME", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=message):
        intern2.create_model("internimage_t", pretrained=True, cache_dir=tmp_path, **TINY)


def test_a_hub_repo_id_loads_from_the_cache_through_every_door(tmp_path, reference, monkeypatch, capsys):
    """`OpenGVLab/...` where a model folder goes (from_pretrained, open_pipeline, --checkpoint, the server's
    --image-model) is the repo's snapshot in the Hugging Face cache, as transformers reads one: here an HF-layout
    InternImage repo (model_type 'internimage', weights under 'model.')."""
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient
    from PIL import Image

    from intern2.pipelines import open_pipeline
    from intern2.serve import load_model_spec
    from intern2.serve.app import create_app
    repo = "OpenGVLab/internimage-tiny"
    folder = hub_path(tmp_path / "hub", repo)
    (folder / "config.json").write_text(json.dumps({"model_type": "internimage", "num_classes": 1000,
                                                    "architectures": ["InternImageModel"], **TINY}))
    from safetensors.torch import save_file
    save_file({f"model.{k}": v.contiguous() for k, v in reference.state_dict().items()}, folder / "model.safetensors")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    model = intern2.from_pretrained(repo)
    assert _outputs_equal(model, reference) and model.pretrained_cfg["hf_hub_id"] == repo
    assert _outputs_equal(intern2.from_pretrained(f"hf-hub:{repo}"), reference)
    image = tmp_path / "a.png"
    Image.new("RGB", (48, 40), (120, 30, 200)).save(image)
    python = open_pipeline(checkpoint=repo)(str(image), topk=3)["top"]
    capsys.readouterr()
    assert cli.main(["predict", str(image), "--checkpoint", repo, "--json", "--topk", "3"]) == 0
    (cli_result,) = json.loads(capsys.readouterr().out)
    with TestClient(create_app(image_model=load_model_spec(repo))) as client:
        http = client.post("/v1/classify", data={"topk": 3}, files={"file": ("a.png", image.read_bytes())}).json()
    for answer in (cli_result["top"], http["top"]):
        assert [(r["label"], r["index"]) for r in answer] == [(r["label"], r["index"]) for r in python]
        assert [r["prob"] for r in answer] == pytest.approx([r["prob"] for r in python], abs=1e-6)
    # A repo the cache lacks, offline: one line naming the flag, the name and what to fetch.
    with pytest.raises(SystemExit) as stop:
        cli.main(["predict", str(image), "--checkpoint", "runs/missing"])
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("intern2 predict: error: --checkpoint runs/missing (no such local folder: read as a Hub "
                          "repo): runs/missing is not in the Hugging Face cache"), err
    assert "HF_HUB_OFFLINE=1: fetch it with `hf download runs/missing --cache-dir " in err
    assert err.endswith("(or download it to a folder and give that folder)"), err
    with pytest.raises(ValueError, match=r"^hf-hub:a/b/c: expected hf-hub:owner/name \(a Hugging Face Hub repo id\)$"):
        intern2.from_pretrained("hf-hub:a/b/c")
    with pytest.raises(FileNotFoundError, match=r"runs/missing\.pth: no such file or folder"):
        open_pipeline(checkpoint="runs/missing.pth")  # a file's name is a path, never a repo


def test_what_is_read_as_a_hub_repo(tmp_path, monkeypatch):
    """`owner/name` is a Hub repo only when no such path exists here and it names no file; a name the Hub would
    refuse ('--', '..', non-ASCII) stays a local path, whose error says it does not exist."""
    from intern2.hub import hub_repo
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "model").mkdir(parents=True)
    (tmp_path / "runs" / "weights").write_bytes(b"")  # a file without a suffix
    for name in ("runs/model", "runs/weights", "./x/y", "/abs/x", "runs\\model", "a..b/c", "exp--1/model",
                 "x/y.pth", "x/y.npz", "dir/sub/model", "ünï/x", "model", "a/" + "b" * 97):
        assert hub_repo(name) is None, name
    for name, repo in (("OpenGVLab/InternVideo2.5", "OpenGVLab/InternVideo2.5"), ("runs/other", "runs/other"),
                       ("hf-hub:runs/model", "runs/model"), ("facebook/nllb-200-distilled-600M", None)):
        assert hub_repo(name) == (repo or name), name
    with pytest.raises(ValueError, match="hf-hub:a--b/c: expected hf-hub:owner/name"):
        hub_repo("hf-hub:a--b/c")


@pytest.mark.parametrize("flag", ["--image-model", "--translator", "--retrieval-model", "--tal-model"])
def test_serve_names_the_flag_of_a_missing_model(flag, capsys):
    pytest.importorskip("uvicorn")
    with pytest.raises(SystemExit) as stop:
        cli.main(["serve", flag, "runs/missing"])
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"intern2 serve: error: {flag} runs/missing (no such local folder: read as a Hub repo)"), err


def test_a_hub_repo_without_its_weights_downloads_none(tmp_path, reference, monkeypatch):
    """from_pretrained(repo, weights=False) (timm's pretrained=False) fetches the configs, not the weight files."""
    import huggingface_hub
    folder = hub_path(tmp_path, "someone/internimage-tiny")
    intern2.save_pretrained(reference, folder)
    asked = []

    def snapshot_download(repo, **kwargs):  # the Hub, simulated: tests never reach the network
        asked.append(kwargs["allow_patterns"])
        return str(folder)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    from intern2.pipelines.common import task_of_arguments
    intern2.from_pretrained("someone/internimage-tiny", weights=False)
    assert task_of_arguments(["--checkpoint", "someone/internimage-tiny"]) == "image-cls"  # the CLI reads the task
    assert _outputs_equal(intern2.from_pretrained("someone/internimage-tiny"), reference)
    for patterns in asked[:2]:
        assert not any(p.endswith((".safetensors", ".bin")) for p in patterns) and "*.json" in patterns
    assert {"*.safetensors", "*.bin"} <= set(asked[2])
    # Offline (the Hub no longer simulated), a snapshot cached without its weights says what to fetch.
    monkeypatch.undo()
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    weights = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"the cached snapshot of someone/internimage-tiny has no weight files "
                                                r"\(\*\.safetensors, \*\.bin\) and downloading is off: fetch them with "
                                                r"`hf download someone/internimage-tiny`"):
        intern2.from_pretrained("someone/internimage-tiny")
    (folder / "model.safetensors").write_bytes(weights)
    # A translation repo of configs only builds its architecture too (its own loader reads weights otherwise).
    translator = intern2.create_model("intern2_mt_tiny", vocab_size=64, encoder_layers=1, decoder_layers=1)
    translator.save_pretrained(folder)
    (folder / "model.safetensors").unlink()
    built = intern2.from_pretrained("someone/internimage-tiny", weights=False)
    assert type(built) is type(translator) and built.config == translator.config
