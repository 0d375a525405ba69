"""Open-Qwen2VL composition: a SigLIP directory + a Qwen2 directory -> a LlavaForConditionalGeneration directory.

References are the source directories themselves, run by transformers: ``SiglipVisionModel`` (its
``hidden_states[-2]``, the second-to-last block's output) and ``Qwen2ForCausalLM`` (text logits); the projector
is checked against a plain-torch Linear-GELU-Linear and against the documented init redrawn here.
"""
from __future__ import annotations

import json
import math
import os
import shutil

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from tests.conftest import ROOT
from tests.tools.conftest import load_tool

FAMILY = "open_qwen2vl"


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    from mllm_mega.models.families.open_qwen2vl.tiny_sources import write_tiny_qwen2_dir, write_tiny_siglip_dir

    root = tmp_path_factory.mktemp("oq_src")
    return {"siglip": write_tiny_siglip_dir(str(root / "siglip"), seed=0),
            "siglip_full": write_tiny_siglip_dir(str(root / "siglip_full"), seed=3, full=True),
            "qwen2": write_tiny_qwen2_dir(str(root / "qwen2"), seed=1),
            "qwen2_tight": write_tiny_qwen2_dir(str(root / "qwen2_tight"), seed=2, tie=True, vocab_size=None,
                                                qwen_vision_tokens=False)}


def _compose(*args):
    return load_tool("compose_model")(["--family", FAMILY, *args])


@pytest.fixture(scope="module")
def composed(sources, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("oq_out") / "oq")
    rc = _compose("--vision-from", sources["siglip"], "--llm-from", sources["qwen2"], "--out", out, "--seed", "3")
    assert rc == 0
    return out


def _tensors(path):
    out = {}
    for name in sorted(os.listdir(path)):
        if name.endswith(".safetensors"):
            out.update(load_file(os.path.join(path, name)))
    return out


def _pixels(image_size=28, n=2, seed=1):
    return torch.randn(n, 3, image_size, image_size, generator=torch.Generator().manual_seed(seed))


def _linear_init(shape, fan_in, gen):
    b = 1.0 / math.sqrt(fan_in)
    return (torch.rand(shape, generator=gen) * 2 - 1) * b


def _vision_matches(model, siglip_dir):
    """The LLaVA image features = plain-torch projector(source SigLIP hidden_states[-2]), exactly."""
    from transformers import SiglipVisionModel

    src = SiglipVisionModel.from_pretrained(siglip_dir).eval()
    pixels = _pixels()
    proj = model.model.multi_modal_projector
    with torch.no_grad():
        hs = src(pixels, output_hidden_states=True).hidden_states
        want = F.linear(F.gelu(F.linear(hs[-2], proj.linear_1.weight, proj.linear_1.bias)),
                        proj.linear_2.weight, proj.linear_2.bias)
        got = torch.stack(model.model.get_image_features(pixel_values=pixels).pooler_output)
        assert got.shape == (2, 49, model.config.text_config.hidden_size)  # 7x7 patches, no CLS cropped
        assert torch.equal(got, want)
        # not the last block, and no post_layernorm on the second-to-last one: both would change the features
        assert not torch.allclose(hs[-2], hs[-1], atol=1e-2)
        assert not torch.allclose(hs[-2], getattr(src, "vision_model", src).post_layernorm(hs[-2]), atol=1e-2)


def _text_logits_diff(model, qwen2_dir, vocab):
    from transformers import Qwen2ForCausalLM

    ref = Qwen2ForCausalLM.from_pretrained(qwen2_dir).eval()
    ids = torch.randint(0, vocab, (2, 13), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = model(input_ids=ids).logits, ref(input_ids=ids).logits
    return (a[..., :b.shape[-1]] - b).abs().max().item()


def test_composed_dir_loads_and_matches_its_sources(sources, composed):
    from transformers import AutoModelForImageTextToText, AutoProcessor, AutoTokenizer

    cfg = json.load(open(os.path.join(composed, "config.json")))
    assert cfg["architectures"] == ["LlavaForConditionalGeneration"]
    assert cfg["vision_feature_layer"] == -1 and cfg["vision_feature_select_strategy"] == "full"
    vc = cfg["vision_config"]
    assert vc["num_hidden_layers"] == 2 and vc["vision_use_head"] is False  # 3 source blocks, the last dropped
    tok = AutoTokenizer.from_pretrained(composed)
    src_tok = AutoTokenizer.from_pretrained(sources["qwen2"])
    assert tok.get_vocab() == src_tok.get_vocab()  # the tokenizer has Qwen2-VL's placeholders: nothing added
    for name in ("tokenizer.json", "tokenizer_config.json"):  # and its files are the source's, byte for byte
        assert open(os.path.join(composed, name), "rb").read() == open(os.path.join(sources["qwen2"], name),
                                                                      "rb").read(), name
    for key, token in (("image_token_index", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
                       ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>")):
        assert cfg[key] == src_tok.convert_tokens_to_ids(token), key
    assert cfg["text_config"]["vocab_size"] == 512

    got, src_vis, src_llm = _tensors(composed), _tensors(sources["siglip"]), _tensors(sources["qwen2"])
    # every source tensor kept (vision: all but block 2 and the head), nothing else besides the projector
    assert not [k for k in got if "layers.2." in k and "vision" in k] and not [k for k in got if ".head." in k]
    assert len(got) == (len([k for k in src_vis if "layers.2." not in k and not k.startswith("head.")])
                        + len(src_llm) + 4)

    gen = torch.Generator().manual_seed(3)  # --seed 3, the documented order and init
    want = {"linear_1.weight": _linear_init((64, 48), 48, gen), "linear_1.bias": _linear_init((64,), 48, gen),
            "linear_2.weight": _linear_init((64, 64), 64, gen), "linear_2.bias": _linear_init((64,), 64, gen)}
    model = AutoModelForImageTextToText.from_pretrained(composed).eval()
    for name, t in want.items():
        assert torch.equal(getattr(model.model.multi_modal_projector, name.split(".")[0]).get_parameter(
            name.split(".")[1]), t), name
    _vision_matches(model, sources["siglip"])
    # text only, tokens of the Qwen2 vocabulary: measured max |diff| 0.0 (fp32, CPU)
    assert _text_logits_diff(model, sources["qwen2"], 512) <= 1e-6

    # the processor expands <image> to the 49 feature tokens and makes 28x28 pixels; the full model runs on it
    import numpy as np

    proc = AutoProcessor.from_pretrained(composed)
    img = (np.random.default_rng(0).random((40, 30, 3)) * 255).astype("uint8")
    batch = proc(text="<|image_pad|>what colour is the shape?", images=[img], return_tensors="pt")
    assert int((batch["input_ids"] == cfg["image_token_index"]).sum()) == 49
    assert tuple(batch["pixel_values"].shape) == (1, 3, 28, 28)
    with torch.no_grad():
        assert torch.isfinite(model(**batch).logits).all()


def test_composed_dir_imports_and_verifies(composed, tmp_path):
    """import-hf reads the composed directory as the open_qwen2vl family (LLaVA form: the pool grid is the patch
    grid) and verify's logits match transformers' on text, one image, three images and a padded batch."""
    from mllm_mega.checkpoint.convert import import_hf, verify
    from mllm_mega.models import registry

    arch = registry.load_arch(composed)
    assert arch.family == FAMILY and arch.vision.num_layers == 2 and arch.vision.tokens_per_image == 49
    ckpt = str(tmp_path / "ckpt")
    import_hf(composed, ckpt, progress=False)
    # fp32 logits, ours vs transformers: the family's verify tolerance (measured 4.2e-7 here)
    assert verify(composed, ckpt)[0] <= 1e-6

    # a run starting from it with its own tokenizer passes the trainer's placeholder-id checks (image, video,
    # vision start must equal the data pipeline's ids) as composed, with no override
    from mllm_mega.config import load_config
    from mllm_mega.data.text import TextProcessor
    from mllm_mega.training.setup import resolve_arch

    cfg = load_config(os.path.join(ROOT, "examples/configs/tiny_open_qwen2vl.yaml"),
                      [f"model.init_from={ckpt}", f"data.tokenizer_dir={composed}", "model.arch_overrides={}"])
    arch = resolve_arch(cfg, TextProcessor(composed))
    assert (arch.image_token_id, arch.vision.tokens_per_image) == (5, 49)


def test_full_siglip_tied_llm_grows_the_vocab(sources, tmp_path):
    """A SiglipModel directory (text tower ignored) + a tied Qwen2 whose tokenizer has no <|image_pad|> and
    whose table has no spare row: <image> is added and gets a new row, the mean of the others; bfloat16
    output, sharded."""
    from transformers import AutoModelForImageTextToText, AutoTokenizer

    out = str(tmp_path / "oq")
    assert _compose("--vision-from", sources["siglip_full"], "--llm-from", sources["qwen2_tight"], "--out", out,
                    "--dtype", "bfloat16", "--max-shard-size", "40KB") == 0
    assert len([n for n in os.listdir(out) if n.endswith(".safetensors")]) > 1
    cfg = json.load(open(os.path.join(out, "config.json")))
    n = len(AutoTokenizer.from_pretrained(sources["qwen2_tight"]))
    assert cfg["image_token_index"] == n and cfg["text_config"]["vocab_size"] == n + 1 and cfg["tie_word_embeddings"]
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.convert_tokens_to_ids("<image>") == n and len(tok) == n + 1  # added, the next id
    assert tok("a<image>b")["input_ids"].count(n) == 1  # one token, not split
    assert "video_token_id" not in cfg and "vision_start_token_id" not in cfg
    got, src = _tensors(out), _tensors(sources["qwen2_tight"])
    emb_key = next(k for k in got if k.endswith("embed_tokens.weight"))
    assert not [k for k in got if "lm_head" in k]  # tied
    emb, old = got[emb_key], src["model.embed_tokens.weight"]
    assert emb.dtype == torch.bfloat16 and emb.shape == (n + 1, 64)
    assert torch.equal(emb[:n], old.to(torch.bfloat16))
    assert torch.equal(emb[n], old.mean(0).to(torch.bfloat16))
    from transformers import SiglipModel

    # the same bf16 rounding of the same fp32 weights on both sides: the features agree exactly
    model = AutoModelForImageTextToText.from_pretrained(out, dtype=torch.bfloat16).eval()
    vis = SiglipModel.from_pretrained(sources["siglip_full"], dtype=torch.bfloat16).vision_model.eval()
    pixels = _pixels().to(torch.bfloat16)
    with torch.no_grad():
        want = vis(pixels, output_hidden_states=True).hidden_states[-2]
        assert torch.equal(model.model.vision_tower(pixels, output_hidden_states=True).hidden_states[-1], want)


def _broken(src, dst, how):
    shutil.copytree(src, dst)
    weights = os.path.join(dst, "model.safetensors")
    if how == "missing_tensor":
        state = load_file(weights)
        del state["model.layers.1.mlp.up_proj.weight"]
        save_file(state, weights, metadata={"format": "pt"})
    elif how == "corrupt":
        with open(weights, "r+b") as f:
            f.truncate(os.path.getsize(weights) // 2)
    return dst


@pytest.mark.parametrize("case,match", [
    ("missing_dir", "is not a directory"),
    ("vision_not_siglip", "expected one of ['siglip_vision_model', 'siglip']"),
    ("llm_not_qwen2", "expected one of ['qwen2']"),
    ("missing_tensor", "missing tensor(s) ['model.layers.1.mlp.up_proj.weight']"),
    ("corrupt", "unreadable weights (SafetensorError"),
    ("mrope", "only '1d'"),
    ("out_not_empty", "exists and is not an empty directory"),
])
def test_bad_inputs_exit_2_and_write_nothing(sources, tmp_path, capsys, case, match):
    vision, llm, extra = sources["siglip"], sources["qwen2"], []
    out = str(tmp_path / "out")
    if case == "missing_dir":
        vision = str(tmp_path / "nope")
    elif case == "vision_not_siglip":
        vision = sources["qwen2"]
    elif case == "llm_not_qwen2":
        llm = sources["siglip"]
    elif case == "mrope":
        extra = ["--position-mode", "mrope"]
    elif case == "out_not_empty":
        os.makedirs(out)
        open(os.path.join(out, "keep.txt"), "w").write("x")
    else:
        llm = _broken(llm, str(tmp_path / "broken"), case)
    assert _compose("--vision-from", vision, "--llm-from", llm, "--out", out, *extra) == 2
    err = capsys.readouterr().err
    assert match in err, err[-2000:]
    if case == "out_not_empty":
        assert os.listdir(out) == ["keep.txt"]
    else:
        assert not os.path.exists(out)
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".compose-")]


def test_a_failure_while_writing_leaves_nothing(sources, tmp_path, monkeypatch):
    """An error after the weights are written (here the processor files: a full disk) removes the temporary
    directory; --out never appears."""
    from transformers import LlavaProcessor

    def boom(self, *a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(LlavaProcessor, "save_pretrained", boom)
    out = str(tmp_path / "out")
    with pytest.raises(OSError, match="No space left"):
        _compose("--vision-from", sources["siglip"], "--llm-from", sources["qwen2"], "--out", out)
    assert os.listdir(tmp_path) == []
