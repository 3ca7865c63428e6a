"""The embedded demo: stdlib corpus, byte-level tokenizer and a tiny GQA Llama (small budgets, offline)."""
import pytest
import torch
from helpers import shipped
from transformers import LlamaForCausalLM

from pipeline.config import DemoParams
from pipeline.model.demo import demo_model_config, pretrain_demo, stdlib_corpus, train_tokenizer

TRAIN_BYTES, EVAL_BYTES = 200_000, 40_000
TINY = DemoParams(corpus_bytes=TRAIN_BYTES, eval_bytes=EVAL_BYTES, vocab_size=400, hidden_size=64, num_layers=2,
                  num_heads=4, num_kv_heads=2, intermediate_size=128, seq_len=64, steps=30, batch_size=8,
                  lr=3e-3, seed=0)


@pytest.fixture(scope="module")
def corpus():
    return stdlib_corpus(TRAIN_BYTES, EVAL_BYTES)


@pytest.fixture(scope="module")
def tokenizer(corpus):
    return train_tokenizer(corpus[0], TINY.vocab_size)


def _sequences(tokenizer, documents, seq_len):
    ids = tokenizer(documents)["input_ids"]
    flat = torch.tensor([t for doc in ids for t in doc + [tokenizer.eos_token_id]])
    n = len(flat) // seq_len
    return flat[: n * seq_len].view(n, seq_len)


def _expected_params(p: DemoParams, vocab: int) -> int:
    h, kv_dim = p.hidden_size, p.hidden_size // p.num_heads * p.num_kv_heads
    per_layer = 2 * h * h + 2 * h * kv_dim + 3 * h * p.intermediate_size + 2 * h  # attn, mlp, 2 norms
    return vocab * h + p.num_layers * per_layer + h  # tied embedding + final norm


def test_corpus_is_deterministic(corpus):
    assert stdlib_corpus(TRAIN_BYTES, EVAL_BYTES) == corpus


def test_corpus_split_is_by_file_and_budgets_are_respected(corpus):
    train, evals, manifest = corpus
    assert manifest["train_files"] == len(train) and manifest["eval_files"] == len(evals)
    assert not set(train) & set(evals)
    for docs, budget, key in ((train, TRAIN_BYTES, "train_bytes"), (evals, EVAL_BYTES, "eval_bytes")):
        sizes = [len(d.encode()) for d in docs]
        assert manifest[key] == sum(sizes) >= budget
        assert sum(sizes) - sizes[-1] < budget  # stops at the first file that crosses the budget
    assert len(manifest["sha256"]) == 64 and manifest["python"]


def test_larger_budgets_extend_both_sides_without_moving_files(corpus):
    train, evals, manifest = corpus
    bigger = stdlib_corpus(2 * TRAIN_BYTES, 2 * EVAL_BYTES)
    assert bigger[0][: len(train)] == train and len(bigger[0]) > len(train)
    assert bigger[1][: len(evals)] == evals and len(bigger[1]) > len(evals)
    assert bigger[2]["sha256"] != manifest["sha256"]


def test_corpus_too_large_names_both_numbers():
    with pytest.raises(ValueError) as err:
        stdlib_corpus(10**12, 1000)
    message = str(err.value).replace(",", "")
    assert str(10**12) in message
    available = int(message.split("has only ")[1].split(" bytes")[0])
    assert 0 < available < 10**12


def test_tokenizer_round_trips_any_text(tokenizer):
    samples = ["def f(x):\n\treturn x  # ok\r\n", "héllo wörld — 日本語 🙂🐍", "\x00\x01\x07\x1b[0m\x7f\u200b",
               "  leading and trailing  ", " , . ; don't", "<s> not special </s>?", ""]
    for text in samples:
        assert tokenizer.decode(tokenizer.encode(text)) == text


def test_tokenizer_has_specials_and_is_deterministic(corpus, tokenizer):
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == ("<s>", "</s>", "<pad>")
    ids = {tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id}
    assert len(ids) == 3 and None not in ids
    assert len(tokenizer) == TINY.vocab_size
    again = train_tokenizer(corpus[0], TINY.vocab_size)
    assert again.get_vocab() == tokenizer.get_vocab()
    text = corpus[1][0][:2000]
    assert again.encode(text) == tokenizer.encode(text)
    assert len(tokenizer.encode(text)) < 0.75 * len(text.encode())  # merges were learned, not just bytes


def test_config_has_gqa_and_expected_size(tokenizer):
    config = demo_model_config(TINY, tokenizer)
    assert config.num_key_value_heads < config.num_attention_heads
    assert config.vocab_size == len(tokenizer) and config.tie_word_embeddings
    assert config.eos_token_id == tokenizer.eos_token_id
    model = LlamaForCausalLM(config)
    n = sum(p.numel() for p in model.parameters())
    assert n == pytest.approx(_expected_params(TINY, len(tokenizer)), rel=0.01)


def test_default_demo_model_is_about_one_million_parameters():
    p = shipped("demo")

    class FakeTokenizer:  # only the size and special ids matter for the config
        bos_token_id, eos_token_id, pad_token_id = 0, 1, 2

        def __len__(self):
            return p.vocab_size

    model = LlamaForCausalLM(demo_model_config(p, FakeTokenizer()))
    n = sum(t.numel() for t in model.parameters())
    assert 0.7e6 <= n <= 1.5e6
    assert n == pytest.approx(_expected_params(p, p.vocab_size), rel=0.01)
    assert model.config.num_key_value_heads < model.config.num_attention_heads


def test_pretraining_reduces_loss_on_stdlib_text(corpus, tokenizer):
    sequences = _sequences(tokenizer, corpus[0], TINY.seq_len)
    steps = []
    model, losses = pretrain_demo(TINY, sequences, tokenizer, on_step=lambda i, info: steps.append(i))
    assert len(losses) == TINY.steps and steps == list(range(TINY.steps))
    assert not model.training
    assert sum(losses[-5:]) / 5 < 0.9 * losses[0]  # ~6.0 (uniform over 400) down to ~5.0


def test_pretraining_is_reproducible_and_checks_sequence_length(corpus, tokenizer):
    p = TINY.model_copy(update={"steps": 3})
    sequences = _sequences(tokenizer, corpus[0][:5], p.seq_len)
    _, first = pretrain_demo(p, sequences, tokenizer)
    _, second = pretrain_demo(p, sequences, tokenizer)
    assert first == second
    with pytest.raises(ValueError, match="seq_len"):
        pretrain_demo(p, torch.zeros(4, p.seq_len + 1, dtype=torch.long), tokenizer)


def test_interrupted_pretraining_resumes_to_the_same_weights(corpus, tokenizer, tmp_path):
    p = TINY.model_copy(update={"steps": 12})
    sequences = _sequences(tokenizer, corpus[0][:5], p.seq_len)
    reference, reference_losses = pretrain_demo(p, sequences, tokenizer)
    checkpoint = tmp_path / "pretrain.pt"

    def stop_at_step_8(step, values):
        if step == 7:
            raise KeyboardInterrupt  # as a Ctrl-C would, after the checkpoint of step 5
    with pytest.raises(KeyboardInterrupt):
        pretrain_demo(p, sequences, tokenizer, on_step=stop_at_step_8, checkpoint=checkpoint, checkpoint_every=5)
    assert checkpoint.is_file() and torch.load(checkpoint, weights_only=False)["step"] == 5
    resumed_steps = []
    resumed, losses = pretrain_demo(p, sequences, tokenizer, on_step=lambda step, _: resumed_steps.append(step),
                                    checkpoint=checkpoint, checkpoint_every=5)
    assert resumed_steps == list(range(5, 12))  # continued, not restarted
    assert losses == reference_losses
    reference_state = reference.state_dict()
    assert all(torch.equal(t, reference_state[name]) for name, t in resumed.state_dict().items())
