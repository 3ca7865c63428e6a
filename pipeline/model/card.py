"""The README.md written into an exported pruned model folder."""
from __future__ import annotations

import json

from pipeline.config import Params
from pipeline.run.stage import section_dicts

STRUCTURE_PNG = "layer_structure.png"


def model_card(params: Params, name: str, levels: dict, dense_params: int, pruned_params: int,
               perplexities: dict[str, float], shape: dict) -> str:
    """`shape`: per layer kept query heads ("q"), key/value heads ("kv") and neuron counts ("neurons")."""
    sections = section_dicts(params, ("model", "data", "database", "search", "finetune"))
    results = "\n".join(f"| {model} | {ppl:.3f} |" for model, ppl in perplexities.items())
    layers = "\n".join(f"| {i} | {a} | {m} | {len(q)} | {len(kv)} | {n} |" for i, (a, m, q, kv, n) in enumerate(
        zip(levels["attn"], levels["mlp"], shape["q"], shape["kv"], shape["neurons"])))
    how = ("per-layer levels found by evolutionary search" if name == "searched"
           else "every layer at the same level: the uniform baseline")
    return f"""---
library_name: transformers
tags: [pruned, structured-pruning, darwinlm]
---
# {'DarwinLM-searched' if name == 'searched' else 'Uniformly'} pruned `{params.model.name_or_path}`

Structurally pruned with darwinlm-pipeline: whole attention heads and MLP neurons removed
({how}),
output projections corrected by structured OBS, then trained {params.finetune.steps} steps.

- Parameters: {dense_params:,} (dense) -> {pruned_params:,} ({pruned_params / dense_params:.1%})
- Target: remove {params.search.target:.0%} of attention+MLP parameters (removed {levels['removed_fraction']:.1%})

## Results

Perplexity on {params.data.eval_tokens:,} held-out tokens (`data.eval`, windows of {params.data.seq_len}):

| model | perplexity |
|---|---|
{results}

## Structure

![kept heads and neurons per layer]({STRUCTURE_PNG})

## Load

```python
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained(PATH, trust_remote_code=True)
tokenizer = AutoTokenizer.from_pretrained(PATH)
```

## Run it with llama.cpp

`dvc repro` also exports this model for llama.cpp (stage `export`): `models/gguf/{name}-<type>.gguf` for each
type in `export.gguf_types`, beside the dense model's and the other pruned model's to compare with. The files use
llama.cpp's `deci` architecture, which reads each layer's query heads, key/value heads and MLP width:

```sh
llama-cli -m models/gguf/{name}-q8_0.gguf -p "Once upon a time" -n 64 --flash-attn on
llama-server -m models/gguf/{name}-q8_0.gguf --port 8080 --flash-attn on   # OpenAI-style API on :8080/v1
```

Keep flash attention on: without it llama.cpp pads every layer's value cache to the widest layer. On CPUs
with AMX (Intel Xeon 4th generation and later), add `--no-repack` if llama.cpp crashes on a quantized
file (llama.cpp issue 20824, not specific to this model). With Ollama (not tested here; its bundled
llama.cpp must know the `deci` architecture):

```sh
printf 'FROM ./{name}-q8_0.gguf\n' > Modelfile && ollama create darwinlm-{name} -f Modelfile
ollama run darwinlm-{name} "Once upon a time"
```

## Levels per layer (0 = dense, {params.database.levels} = module removed)

| layer | attention level | MLP level | query heads kept | key/value heads kept | MLP neurons kept |
|---|---|---|---|---|---|
{layers}

## Params used

```json
{json.dumps(sections, indent=1)}
```
"""
