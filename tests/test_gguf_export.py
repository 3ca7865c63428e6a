"""GGUF export for llama.cpp (`deci`): the rewrites checked against independent computations, and the
exported files run in llama.cpp (llama-cpp-python) against PyTorch's logits, on tiny models with every
case `deci` cannot express directly and on a pruned stories260K."""
import copy
import math

import gguf
import numpy as np
import pytest
import torch
from helpers import SHARED_DATA, byte_level_tokenizer, pruned_by_slicing, tiny_family, tiny_llama

from pipeline.config import GGUF_BY_LLAMA_CPP, GGUF_WRITTEN
from pipeline.errors import ExportError
from pipeline.evaluate import llama_cpp_model, llama_cpp_speed, ranges_apart, spread
from pipeline.model.gguf_export import (
    LLAMA_CPP_TYPES,
    WRITTEN_TYPES,
    deci_layers,
    interleave_rope_rows,
    query_slots,
    write_gguf,
)

try:
    import llama_cpp
except ImportError:  # built from source at install (requirements.txt); the rest still runs
    llama_cpp = None
needs_llama_cpp = pytest.mark.skipif(
    llama_cpp is None, reason="llama-cpp-python is not installed (requirements.txt): GGUF files not run in llama.cpp")
STORIES = SHARED_DATA / "stories260K"
SMOLLM2 = SHARED_DATA / "smollm2-135m"
needs_stories = pytest.mark.skipif(not (STORIES / "model.safetensors").is_file(),
                                   reason=f"test asset {STORIES} is absent")

# Per layer of the tiny hard-case models (8 query heads in 2 groups of 4, MLP width 64):
# kept query heads and MLP width.
HARD_HEADS = [[],             # layer 0 without attention: llama.cpp reads the head size from layer 0
              [0, 1, 2, 4],   # uneven groups (3 + 1): padded with two zero query heads
              [1, 5],         # balanced groups (1 + 1)
              [],             # neither attention nor MLP
              list(range(8)),  # full layer
              [0, 1, 2, 3]]   # one key/value head gone, and the last layer without MLP
HARD_MLP = [64, 32, 0, 0, 64, 0]
SAMPLE = ("Once upon a time, there was a little girl named Lily. She had 3 cats and 12 dogs!\n"
          "  def f(x):\n        return x ** 2  # tabs\tand  spaces, ümlauts, 日本語, emoji 🙂.")


def hard_case_model(family: str):
    dense = tiny_family(family, layers=6, heads=8, kv_heads=2, hidden=64, intermediate=64, vocab=320)
    return pruned_by_slicing(dense, HARD_HEADS, HARD_MLP)


def llama_cpp_logits(path, tokens, flash_attn=False) -> np.ndarray:
    """Logits of every position, KV cache in f32 so nothing but the weights' own type rounds."""
    llm = llama_cpp_model(path, n_ctx=64, n_batch=64, n_ubatch=64, n_threads=1, logits_all=True,
                          type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32, flash_attn=flash_attn)
    try:
        llm.eval(list(tokens))
        return np.array(llm.scores[:len(tokens)], dtype=np.float64)
    finally:
        llm.close()


@torch.no_grad()
def torch_logits(model, tokens) -> np.ndarray:
    return model(torch.tensor([list(tokens)])).logits[0].double().numpy()


def relative_error(logits: np.ndarray, reference: np.ndarray) -> float:
    """Largest deviation relative to the logits' scale (per-entry relative error blows up near 0)."""
    return float(np.abs(logits - reference).max() / np.abs(reference).max())


def token_sequence(length=32, vocab=300, seed=0) -> list[int]:
    return torch.randint(0, vocab, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


def perplexity_of(logits: np.ndarray, tokens) -> float:
    logits = logits[:-1]
    log_probs = logits - logits.max(-1, keepdims=True)
    log_probs -= np.log(np.exp(log_probs).sum(-1, keepdims=True))
    return math.exp(-float(log_probs[np.arange(len(tokens) - 1), tokens[1:]].mean()))


# --- the rewrites, without llama.cpp ----------------------------------------------------------

def test_query_slots_pad_uneven_groups_to_the_largest():
    assert query_slots([0, 0, 1, 1], 2) == (0, 1, 2, 3)
    assert query_slots([0, 0, 0, 1], 2) == (0, 1, 2, 3, None, None)
    assert query_slots([1, 0, 1], 2) == (1, None, 0, 2)  # grouped by key/value head, in order
    assert query_slots([], 0) == ()


def test_interleaved_rows_rotate_pairs_as_rotate_half_rotates_halves():
    """RoPE in rotate-half order on W x equals RoPE on consecutive pairs of (interleaved W) x,
    read back in interleaved order: both rotate (x_i, x_{i+d/2}) by angle i."""
    head_dim, heads, width = 8, 3, 5
    weight, x = torch.randn(heads * head_dim, width, dtype=torch.float64), torch.randn(width, dtype=torch.float64)
    angles = torch.rand(head_dim // 2, dtype=torch.float64) * 6
    cos, sin = angles.cos(), angles.sin()
    halves = (weight @ x).view(heads, 2, head_dim // 2)
    rotate_half = torch.stack([halves[:, 0] * cos - halves[:, 1] * sin,
                               halves[:, 1] * cos + halves[:, 0] * sin], 1).reshape(-1)
    pairs = (torch.from_numpy(interleave_rope_rows(weight.numpy(), head_dim)) @ x).view(heads, head_dim // 2, 2)
    rotate_pairs = torch.stack([pairs[..., 0] * cos - pairs[..., 1] * sin,
                                pairs[..., 0] * sin + pairs[..., 1] * cos], -1).reshape(-1)
    expected = torch.from_numpy(interleave_rope_rows(rotate_half.numpy()[:, None], head_dim))[:, 0]
    torch.testing.assert_close(rotate_pairs, expected)


def test_hard_cases_become_what_deci_expresses():
    model = hard_case_model("llama")
    layers = deci_layers(model.config, [(False, False)] * 6)
    assert [la.head_count for la in layers] == [1, 6, 2, 0, 8, 4]
    assert [la.kv_heads for la in layers] == [1, 2, 2, 0, 2, 1]
    assert [la.padded_heads for la in layers] == [1, 2, 0, 0, 0, 0]
    assert [la.feed_forward_length for la in layers] == [64, 32, 1, 1, 64, 1]
    assert all(la.kv_heads > 0 for la in layers if la.head_count > 0)  # never Nemotron's linear attention


def test_every_type_params_accept_has_a_writer():
    assert set(WRITTEN_TYPES) == set(GGUF_WRITTEN) and set(LLAMA_CPP_TYPES) == set(GGUF_BY_LLAMA_CPP)


def test_refuses_qwen3_before_writing(tmp_path):
    with pytest.raises(ExportError, match="q_norm"):
        write_gguf(tiny_family("qwen3"), byte_level_tokenizer(), tmp_path / "m.gguf", "f16")
    assert not (tmp_path / "m.gguf").exists()


def test_refuses_unknown_type_and_pre_tokenizer(tmp_path):
    with pytest.raises(ExportError, match="valid: f32, f16, q8_0"):
        write_gguf(tiny_llama(vocab=320), byte_level_tokenizer(), tmp_path / "m.gguf", "q3")
    tokenizer = byte_level_tokenizer()
    from tokenizers import pre_tokenizers
    tokenizer.backend_tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    with pytest.raises(ExportError, match="pre-tokenizer"):
        write_gguf(tiny_llama(vocab=320), tokenizer, tmp_path / "m.gguf", "f16")


# --- in llama.cpp ------------------------------------------------------------------------------

@needs_llama_cpp
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_hard_cases_match_pytorch_in_llama_cpp(tmp_path, family):
    """f32 without flash attention: only the order of float32 sums differs, so 1e-4 of the logits'
    scale (measured: ~1e-6). f16: every weight is rounded to 11 significant bits and llama.cpp also
    rounds activations to f16 before each matmul, so the reference is PyTorch with f16-rounded weights
    and the bound 3e-3 of the logits' scale (a few f16 roundings of ~5e-4 through 6 layers). Flash
    attention: ggml's CPU kernel is not f32-exact (measured ~1e-3 on f32 files, dense models included),
    so it is held to the f16 bound."""
    model = hard_case_model(family)
    tokens = token_sequence()
    reference = torch_logits(model, tokens)
    f16_reference = torch_logits(copy.deepcopy(model).half().float(), tokens)
    for gguf_type, expected, bound in (("f32", reference, 1e-4), ("f16", f16_reference, 3e-3)):
        path = tmp_path / f"{family}-{gguf_type}.gguf"
        write_gguf(model, byte_level_tokenizer(), path, gguf_type)
        for flash_attn in (False, True):
            error = relative_error(llama_cpp_logits(path, tokens, flash_attn), expected)
            assert error < (3e-3 if flash_attn else bound), f"{family} {gguf_type} flash_attn={flash_attn}: {error:.2e}"


@needs_llama_cpp
@pytest.mark.parametrize("family", ["llama_mha", "mistral"])
def test_dense_models_match_pytorch_in_llama_cpp(tmp_path, family):
    model = tiny_family(family, layers=2, heads=4, kv_heads=2, hidden=64, intermediate=64, vocab=320)
    tokens = token_sequence()
    write_gguf(model, byte_level_tokenizer(), tmp_path / "m.gguf", "f32")
    assert relative_error(llama_cpp_logits(tmp_path / "m.gguf", tokens), torch_logits(model, tokens)) < 1e-4


@needs_llama_cpp
def test_llama3_rope_scaling_is_written_as_rope_freqs(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=320, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0,
                                          "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                          "original_max_position_embeddings": 16})
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(4.0) if p.dim() == 2 else None
    tokens = token_sequence(48)
    write_gguf(model, byte_level_tokenizer(), tmp_path / "m.gguf", "f32")
    assert "rope_freqs.weight" in [t.name for t in gguf.GGUFReader(tmp_path / "m.gguf").tensors]
    assert relative_error(llama_cpp_logits(tmp_path / "m.gguf", tokens), torch_logits(model, tokens)) < 1e-4


@needs_llama_cpp
def test_byte_level_tokenization_equals_hugging_face(tmp_path):
    """The demo's tokenizer kind (byte-level BPE, GPT-2 splitting, no prefix space) as llama.cpp's `gpt-2`."""
    tokenizer = byte_level_tokenizer()
    write_gguf(tiny_llama(vocab=320, hidden=32), tokenizer, tmp_path / "m.gguf", "f32")
    assert llama_cpp_tokens(tmp_path / "m.gguf", SAMPLE) == tokenizer.encode(SAMPLE, add_special_tokens=False)


@needs_llama_cpp
@pytest.mark.skipif(not SMOLLM2.is_dir(), reason=f"test asset {SMOLLM2} is absent")
def test_smollm2_tokenization_equals_hugging_face(tmp_path):
    """SmolLM2's byte-level BPE (49,152 tokens, as transformers reads it from the GGUF) on a model of its
    vocabulary size: `gpt-2` splitting, its special tokens as control tokens."""
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(SMOLLM2, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    write_gguf(tiny_llama(vocab=len(tokenizer), hidden=32, layers=1), tokenizer, tmp_path / "m.gguf", "f16")
    text = stories_text() + SAMPLE
    assert llama_cpp_tokens(tmp_path / "m.gguf", text) == tokenizer.encode(text, add_special_tokens=False)


def llama_cpp_tokens(path, text: str) -> list[int]:
    llm = llama_cpp_model(path, vocab_only=True)
    try:
        return llm.tokenize(text.encode(), add_bos=False, special=False)
    finally:
        llm.close()


# --- stories260K (a real SentencePiece Llama), pruned ------------------------------------------------

@pytest.fixture(scope="module")
def stories():
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(STORIES, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(STORIES)
    # 8 query heads in 4 groups of 2: uneven groups, a layer without attention, a removed MLP.
    heads = [[0, 1, 2, 3, 4, 5, 6, 7], [0, 1, 2, 5], [], [1, 3, 5, 7], [0, 2, 3]]
    neurons = [172, 96, 128, 0, 160]
    return pruned_by_slicing(model, heads, neurons), tokenizer


def stories_text(chars=3000) -> str:
    return (SHARED_DATA / "tinystories" / "dev.txt").read_text(encoding="utf-8")[:chars]


@needs_llama_cpp
@needs_stories
def test_pruned_stories260k_matches_pytorch_in_llama_cpp(tmp_path, stories):
    model, tokenizer = stories
    tokens = tokenizer.encode(stories_text(400))[:60]
    write_gguf(model, tokenizer, tmp_path / "s.gguf", "f32")
    assert relative_error(llama_cpp_logits(tmp_path / "s.gguf", tokens), torch_logits(model, tokens)) < 1e-4


@needs_llama_cpp
@needs_stories
def test_sentencepiece_tokenization_equals_hugging_face(tmp_path, stories):
    model, tokenizer = stories
    write_gguf(model, tokenizer, tmp_path / "s.gguf", "f32")
    text = stories_text() + SAMPLE
    assert llama_cpp_tokens(tmp_path / "s.gguf", text) == tokenizer.encode(text, add_special_tokens=False)


def llama_cpp_perplexity(path, tokens, window=512) -> float:
    llm = llama_cpp_model(path, n_ctx=window, n_batch=window, n_ubatch=window, n_threads=1, logits_all=True,
                          type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32)
    try:
        log_ppl = []
        for start in range(0, len(tokens), window):
            chunk = tokens[start:start + window]
            llm.reset()
            llm.eval(chunk)
            log_ppl.append(math.log(perplexity_of(np.array(llm.scores[:len(chunk)], dtype=np.float64), chunk)))
        return math.exp(sum(log_ppl) / len(log_ppl))
    finally:
        llm.close()


@needs_llama_cpp
@needs_stories
def test_q8_0_perplexity_within_one_percent_of_f16(tmp_path, stories):
    """On 2048 tokens of TinyStories (measured: q8_0 +0.4% over f16 for this heavily pruned model,
    +0.15% for the dense one); q4_k_m comes from llama.cpp's own quantizer (measured +6.6%: at hidden
    size 64 most rows fall back from K-quants to q5_0 / q8_0 / f16)."""
    model, tokenizer = stories
    tokens = tokenizer.encode(stories_text(20000))[:2048]
    ppl = {}
    for gguf_type in ("f16", "q8_0", "q4_k_m"):
        write_gguf(model, tokenizer, tmp_path / f"s-{gguf_type}.gguf", gguf_type)
        ppl[gguf_type] = llama_cpp_perplexity(tmp_path / f"s-{gguf_type}.gguf", tokens)
    assert abs(ppl["q8_0"] / ppl["f16"] - 1) < 0.01, ppl
    assert abs(ppl["q4_k_m"] / ppl["f16"] - 1) < 0.1, ppl


def test_spread_and_when_a_speed_ratio_means_something():
    assert spread([1.0, 2.0, 4.0]) == 1.5
    assert ranges_apart([1.0, 1.1], [1.2, 1.5]) and ranges_apart([1.2, 1.5], [1.0, 1.1])  # either way round
    assert not ranges_apart([1.0, 1.3], [1.2, 1.5])  # ranges overlap: noise could explain the ratio


@needs_llama_cpp
def test_llama_cpp_speed_runs_every_model_each_round(tmp_path):
    """Runs, not timing: the figures exist for every model, from `repeats` rounds after warm-up."""
    paths = {}
    for name, heads in (("dense", HARD_HEADS[4]), ("pruned", HARD_HEADS[1])):
        model = pruned_by_slicing(tiny_family("llama", layers=2, heads=8, kv_heads=2, hidden=64, intermediate=64,
                                              vocab=320), [heads, heads], [64, 32])
        write_gguf(model, byte_level_tokenizer(), tmp_path / f"{name}.gguf", "q8_0")
        paths[name] = tmp_path / f"{name}.gguf"
    speed = llama_cpp_speed(paths, prompt_len=8, decode_tokens=2, repeats=2, warmup=1, threads=1)
    assert set(speed) == {"dense", "pruned"}
    for figures in speed.values():
        assert len(figures["prefill_times"]) == len(figures["decode_times"]) == 2
        assert figures["prefill_tokens_per_s"] > 0 and figures["decode_ms_per_token"] > 0
