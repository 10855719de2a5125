"""`lmexport` command line: each command parses, calls the Python API, prints, sets the exit code.

Exit codes: 0 success, 1 `verify` found a parity failure, 2 bad input or usage (one line on stderr).
"""

from __future__ import annotations

import json
import sys
import traceback
from collections import Counter
from pathlib import Path
from typing import Any

import click

from .errors import LmexportError


class _BadInput(click.ClickException):
    exit_code = 2

    def show(self, file: Any = None) -> None:
        click.echo(f"lmexport: error: {self.format_message()}", err=True)


def _one_line(error: click.UsageError) -> _BadInput:
    """A usage error (a bad option value, a missing argument) as one line, like every other bad
    input, instead of click's usage block; the command is named so the line stands alone."""
    ctx = error.ctx
    where = f"{ctx.info_name}: " if ctx is not None and ctx.parent is not None else ""
    return _BadInput(where + error.format_message())


def _report_file(path: Path | None, flag: str) -> Path | None:
    """Checked before a long run, so that a path it could not write fails now, not at the end
    (with exit code 1, which `verify` means as a parity failure)."""
    if path is None:
        return None
    if path.is_dir():
        raise LmexportError(f"{flag} {path}: is a folder")
    if not path.absolute().parent.is_dir():
        raise LmexportError(f"{flag} {path}: folder {path.absolute().parent} does not exist")
    return path


def _write(path: Path, text: str) -> None:
    try:
        path.write_text(text)
    except OSError as e:
        raise LmexportError(f"{path}: cannot write ({e.strerror})") from None


class _Group(click.Group):
    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        try:
            return super().parse_args(ctx, args)
        except click.exceptions.NoArgsIsHelpError:
            raise  # `lmexport` alone prints the help
        except click.UsageError as e:
            raise _one_line(e) from None

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except LmexportError as e:
            if ctx.params.get("debug"):  # the traceback too, but still bad input: exit code 2
                traceback.print_exc()
            raise _BadInput(str(e)) from None
        except click.exceptions.NoArgsIsHelpError:
            raise
        except click.UsageError as e:
            raise _one_line(e) from None


@click.group(cls=_Group)
@click.option("--debug", is_flag=True, help="Show tracebacks for errors.")
@click.version_option(package_name="lmexport")
def cli(debug: bool) -> None:
    """Export Llama-family and HorNet models to ONNX, run them with onnxruntime, and prove
    parity."""


def _quantize_flags(command: Any) -> Any:
    """--quantize and its settings, for convert and optimize."""
    flags = [
        click.option("--quantize", default=None, help="Weight-only quantization: int4 or int8."),
        click.option(
            "--block-size", type=int, default=None, help="Weights per scale (power of 2 ≥ 16; 32)."
        ),
        click.option(
            "--quantize-lm-head/--no-quantize-lm-head",
            default=None,
            help="Quantize the LM head too (default: yes).",
        ),
        click.option(
            "--lm-head-bits",
            type=int,
            default=None,
            help="The LM head's bits, 4 or 8 (default: --quantize's).",
        ),
        click.option(
            "--quantize-embedding", is_flag=True, default=None, help="Quantize the embedding."
        ),
        click.option(
            "--symmetric",
            is_flag=True,
            default=None,
            help="No zero points (code 2^(bits-1) is 0): smaller, less accurate.",
        ),
        click.option(
            "--float-offsets",
            is_flag=True,
            default=None,
            help="Per-block float minimum, as GGUF's Q4_1 (exact on its weights): one more "
            "small MatMul per weight.",
        ),
        click.option(
            "--accuracy-level",
            type=int,
            default=None,
            help="MatMulNBits compute: 4 int8 (default, fastest on CPU) … 0 float32.",
        ),
    ]
    for flag in reversed(flags):
        command = flag(command)
    return command


def _quantize_options(flags: dict[str, Any]) -> Any:
    from .quantize import quantize_options

    settings = {k: v for k, v in flags.items() if k != "quantize" and v is not None}
    if flags["quantize"] is None:
        if settings:
            names = ", ".join("--" + k.replace("_", "-") for k in settings)
            raise LmexportError(f"{names}: only with --quantize int4|int8")
        return None
    return quantize_options(
        flags["quantize"],
        block_size=settings.get("block_size", 32),
        lm_head=settings.get("quantize_lm_head", True),
        embedding=settings.get("quantize_embedding", False),
        accuracy_level=settings.get("accuracy_level", 4),
        symmetric=settings.get("symmetric", False),
        offsets=settings.get("float_offsets", False),
        lm_head_bits=settings.get("lm_head_bits"),
    )


@cli.command()
@click.argument("source")
@click.option("-o", "--output", "outdir", required=True, type=click.Path(path_type=Path))
@click.option(
    "--target",
    default="ort",
    show_default=True,
    help="ort: onnxruntime fused ops; onnx: opset 23 fused ops; plain: primitive ops.",
)
@click.option("--dtype", default="float32", show_default=True)
@click.option("--no-kv-cache", is_flag=True, help="One full forward, no past/present tensors.")
@click.option(
    "--seed", type=click.IntRange(min=0), default=None, help="Weight seed of a preset (default 0)."
)
@click.option("--force", is_flag=True, help="Replace OUTDIR if it exists.")
@click.option("--arch", default=None, help="Architecture of a checkpoint file (hornet-tiny-gf, …).")
@click.option(
    "--image-size", type=int, default=None, help="HorNet input size (GF models run at this size)."
)
@click.option(
    "--adapter",
    type=click.Path(path_type=Path),
    default=None,
    help="PEFT LoRA adapter folder to merge into the weights.",
)
@click.option(
    "--streaming/--no-streaming",
    default=None,
    help="Read a checkpoint folder one tensor at a time, in bounded memory (default: when its "
    "weight files exceed 2 GiB).",
)
@click.option("-q", "--quiet", is_flag=True, help="No progress on stderr.")
@_quantize_flags
def convert(
    source: str,
    outdir: Path,
    target: str,
    dtype: str,
    no_kv_cache: bool,
    seed: int | None,
    force: bool,
    arch: str | None,
    image_size: int | None,
    adapter: Path | None,
    streaming: bool | None,
    quiet: bool,
    **quantize: Any,
) -> None:
    """Export SOURCE (a preset name, a Hugging Face, Meta or torchtune model folder, or a HorNet
    .pth with --arch) to OUTDIR."""
    from .exporter import convert as run

    folder = run(
        source,
        outdir,
        target=target,
        dtype=dtype,
        kv_cache=not no_kv_cache,
        seed=seed,
        force=force,
        arch=arch,
        image_size=image_size,
        adapter=adapter,
        quantize=_quantize_options(quantize),
        streaming=streaming,
        progress=not quiet,
    )
    click.echo(
        f"wrote {folder}/model.onnx ({target}, {dtype}{', no KV cache' if no_kv_cache else ''})"
    )
    _echo_quantization(folder)


def _echo_quantization(folder: Path) -> None:
    from .runtime.manifest import read_manifest

    record = read_manifest(folder).get("quantization")
    if record and record["accuracy"] is None:
        click.echo(f"{record['method']} (block {record['block_size']}): accuracy not measured")
    elif record:
        accuracy = record["accuracy"]
        click.echo(
            f"{record['method']} (block {record['block_size']}): top-1 agreement with float32 "
            f"{accuracy['top1_agreement']:.1%}, KL {accuracy['kl']:.4f} over "
            f"{accuracy['positions']} positions"
        )


@cli.command()
@click.argument("source", type=click.Path(path_type=Path))
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path))
@click.option("--target", type=click.Choice(["ort", "onnx"]), default="ort", show_default=True)
@click.option("--report", "report_path", type=click.Path(path_type=Path), default=None)
@click.option("--no-check", is_flag=True, help="Skip the before/after parity run (huge graphs).")
@click.option("-v", "--verbose", is_flag=True, help="List refused matches and why.")
@click.option("--force", is_flag=True, help="Replace OUTPUT if it exists.")
@click.option(
    "--max-positions",
    type=int,
    default=None,
    help="Rows of a rotary cache built from angles the graph computes (default: a folder's "
    "context, 8192 for a file).",
)
@_quantize_flags
def optimize(
    source: Path,
    output: Path,
    target: str,
    report_path: Path | None,
    no_check: bool,
    verbose: bool,
    force: bool,
    max_positions: int | None,
    **quantize: Any,
) -> None:
    """Fuse RMSNorm, rotary and grouped attention in SOURCE (an ONNX file, or a folder from
    `convert --target plain`) and write OUTPUT (a file, or a new folder)."""

    from .optimizers import optimize_file

    options = _quantize_options(quantize)
    _report_file(report_path, "--report")
    report = optimize_file(
        source,
        output,
        target,
        check=not no_check,
        quantize=options,
        force=force,
        max_positions=max_positions,
    )
    click.echo(report.table(verbose))
    if report_path is not None:
        _write(report_path, json.dumps(report.to_dict(), indent=2))
    click.echo(f"wrote {output}")
    if options is not None:
        _echo_quantization(output)


@cli.command()
@click.argument("folder", type=click.Path(path_type=Path))
@click.option(
    "--source", default=None, help="PyTorch source to compare with (default: lmexport.json's)."
)
@click.option("--provider", default="cpu", show_default=True)
@click.option("--steps", default=32, show_default=True, help="Greedy tokens to compare.")
@click.option(
    "--seed",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="Seed of the random inputs.",
)
@click.option("--json", "json_path", type=click.Path(path_type=Path), default=None)
def verify(
    folder: Path, source: str | None, provider: str, steps: int, seed: int, json_path: Path | None
) -> None:
    """Compare FOLDER's model in onnxruntime with its PyTorch source on the same inputs."""
    from .verify import run_verify

    _report_file(json_path, "--json")
    report = run_verify(folder, source=source, provider=provider, steps=steps, seed=seed)
    click.echo(report.table())
    if json_path is not None:
        _write(json_path, report.to_json())
    if not report.passed:
        sys.exit(1)


def _parse_ids(text: str) -> list[int]:
    try:
        ids = [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        raise LmexportError(f"--ids must be comma-separated integers, got {text!r}") from None
    if not ids:
        raise LmexportError("--ids is empty")
    return ids


def _prompt_rows(
    folder: Path, prompts: list[str], id_lists: tuple[str, ...], chat: bool, tokenizer: Any
) -> list[list[int]]:
    """Every prompt of the batch as token ids (chat prompts through the folder's template)."""
    from .runtime import load_chat_template

    if bool(prompts) == bool(id_lists):
        raise LmexportError("give either --prompt (or --prompt-file) or --ids")
    if id_lists:
        if chat:
            raise LmexportError("--chat takes text prompts (--prompt), not --ids")
        return [_parse_ids(text) for text in id_lists]
    if chat:
        template = load_chat_template(folder)
        return [template.encode(tokenizer, [{"role": "user", "content": p}]) for p in prompts]
    return [list(tokenizer.encode(p).ids) for p in prompts]


def _read_prompt_file(path: Path) -> list[str]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise LmexportError(f"{path}: cannot read prompts ({e})") from None
    prompts = [line for line in lines if line.strip()]
    if not prompts:
        raise LmexportError(f"{path}: no prompts (one a line)")
    return prompts


@cli.command()
@click.argument("folder", type=click.Path(path_type=Path))
@click.option(
    "--prompt",
    "prompts",
    multiple=True,
    help="Text, encoded with the folder's tokenizer.json; repeat for a batch.",
)
@click.option(
    "--prompt-file",
    type=click.Path(path_type=Path),
    default=None,
    help="A batch of prompts, one a line.",
)
@click.option("--ids", "id_lists", multiple=True, help="Token ids, e.g. 1,2,3; repeat for a batch.")
@click.option("--chat", is_flag=True, help="Send each prompt as a user turn of the chat template.")
@click.option("--stop", multiple=True, help="End when the text contains STR (not printed).")
@click.option("--max-new-tokens", default=32, show_default=True)
@click.option("--temperature", default=0.0, show_default=True, help="0: greedy.")
@click.option("--top-k", default=0, show_default=True, help="0: off.")
@click.option("--top-p", default=1.0, show_default=True, help="1: off.")
@click.option("--min-p", default=0.0, show_default=True, help="0: off.")
@click.option("--repetition-penalty", default=1.0, show_default=True, help="1: off.")
@click.option(
    "--seed",
    type=click.IntRange(min=0),
    default=None,
    help="Makes a sampled generation reproducible.",
)
@click.option("--draft", type=click.Path(path_type=Path), default=None, help="Draft model folder.")
@click.option("--draft-tokens", default=4, show_default=True, help="Proposals per round.")
@click.option(
    "--provider", default="cpu", show_default=True, help="cpu, cuda, or auto (CUDA if it can)."
)
def generate(
    folder: Path,
    prompts: tuple[str, ...],
    prompt_file: Path | None,
    id_lists: tuple[str, ...],
    chat: bool,
    stop: tuple[str, ...],
    max_new_tokens: int,
    temperature: float,
    top_k: int,
    top_p: float,
    min_p: float,
    repetition_penalty: float,
    seed: int | None,
    draft: Path | None,
    draft_tokens: int,
    provider: str,
) -> None:
    """Continue prompts (greedy unless --temperature > 0), printing as the text comes; a batch
    (several prompts) prints each prompt's text after `[n] `, in prompt order. Text when FOLDER
    has a tokenizer, else ids."""
    from .runtime import LlamaRunner, load_chat_template

    texts = [*prompts, *(_read_prompt_file(prompt_file) if prompt_file is not None else [])]
    _turn_taking(draft, None)
    runner = LlamaRunner.load(folder, provider=provider, spinning=draft is None)
    if provider == "auto" and runner.provider == "cpu":
        click.echo("lmexport: CUDA is not available here; running on the CPU", err=True)
    has_tokenizer = (folder / "tokenizer.json").is_file()
    if stop and not has_tokenizer:
        raise LmexportError(f"{folder}: no tokenizer.json, so --stop strings cannot be matched")
    tokenizer = runner.tokenizer if texts or has_tokenizer else None
    rows = _prompt_rows(folder, texts, id_lists, chat, tokenizer)
    eos = list(runner.eos_token_ids)
    if chat:
        eos += load_chat_template(folder).end_token_ids(tokenizer)
    options: dict[str, Any] = dict(
        eos_token_id=eos,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        min_p=min_p,
        repetition_penalty=repetition_penalty,
        seed=seed,
        draft=None if draft is None else LlamaRunner.load(draft, provider, spinning=False),
        draft_tokens=draft_tokens,
    )
    if tokenizer is None:
        produced: list[list[int]] = [[] for _ in rows]
        ended = [False] * len(rows)
        for step in runner.stream(rows, max_new_tokens, **options):
            for i, token in enumerate(step.tolist()):
                if not ended[i]:
                    produced[i].append(token)
                    ended[i] = token in eos
            if len(rows) == 1:
                click.echo(f"{produced[0][-1]} ", nl=False)
        if len(rows) > 1:
            for i, row in enumerate(produced, 1):
                click.echo(f"[{i}] {' '.join(map(str, row))}")
        else:
            click.echo()
        return
    if len(rows) == 1:
        for text_step in runner.stream_text(rows, max_new_tokens, stop=stop, **options):
            click.echo(text_step.text[0], nl=False)  # click.echo flushes: text shows as it comes
        click.echo()
        return
    for i, text in enumerate(runner.generate_text(rows, max_new_tokens, stop=stop, **options), 1):
        click.echo(f"[{i}] {text}")


@cli.command()
@click.argument("folder", type=click.Path(path_type=Path))
@click.argument("images", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--top", default=5, show_default=True, help="Classes to print per image.")
@click.option("--image-size", type=int, default=None, help="Input size (default: the folder's).")
@click.option("--provider", default="cpu", show_default=True)
def classify(
    folder: Path, images: tuple[Path, ...], top: int, image_size: int | None, provider: str
) -> None:
    """Top classes of each image with FOLDER's HorNet (labels from FOLDER/labels.txt if any)."""
    from .runtime import ImageClassifier

    if top < 1:
        raise LmexportError("--top must be at least 1")
    classifier = ImageClassifier.load(folder, provider=provider)
    pixels = [classifier.load_image(image, image_size) for image in images]
    for image, predictions in zip(images, classifier.predict(pixels, top), strict=True):
        click.echo(f"{image}:")
        for p in predictions:
            click.echo(f"  {p.probability:7.2%}  {p.index:>5}  {p.label}")


@cli.command()
@click.argument("folder", type=click.Path(path_type=Path))
@click.option("--prompt-length", default=128, show_default=True, help="Prompt tokens (random).")
@click.option("--new-tokens", default=128, show_default=True, help="Greedy tokens to decode.")
@click.option("--threads", type=int, default=None, help="Intra-op threads (default: all cores).")
@click.option("--repeats", default=3, show_default=True, help="Timed rounds (median).")
@click.option("--vs-torch", is_flag=True, help="Run the PyTorch source too, interleaved.")
@click.option("--source", default=None, help="--vs-torch source (default: the folder's).")
@click.option("--draft", type=click.Path(path_type=Path), default=None, help="Draft model folder.")
@click.option("--draft-tokens", default=4, show_default=True, help="Proposals per round.")
@click.option("--provider", default="cpu", show_default=True)
@click.option("--json", "json_path", default=None, help="Every figure to FILE (-: stdout).")
def bench(
    folder: Path,
    prompt_length: int,
    new_tokens: int,
    threads: int | None,
    repeats: int,
    vs_torch: bool,
    source: str | None,
    draft: Path | None,
    draft_tokens: int,
    provider: str,
    json_path: str | None,
) -> None:
    """Prefill latency, time to first token, decode tokens/s and peak RSS of FOLDER's model."""

    from .bench import all_cores
    from .bench import bench as run

    _turn_taking(draft, all_cores(threads))
    json_file = None if json_path in (None, "-") else _report_file(Path(json_path), "--json")
    report = run(
        folder, prompt_length=prompt_length, new_tokens=new_tokens, threads=threads,
        repeats=repeats, provider=provider, vs_torch=vs_torch, source=source, draft=draft,
        draft_tokens=draft_tokens,
    )  # fmt: skip
    text = json.dumps(report.to_dict(), indent=2)
    if json_path == "-":
        click.echo(text)
        return
    click.echo(report.table())
    if json_file is not None:
        _write(json_file, text)


@cli.command()
@click.argument("path", type=click.Path(path_type=Path))
def inspect(path: Path) -> None:
    """Op histogram, opsets and I/O of an ONNX file (or of a folder's model.onnx)."""
    import onnx

    file = path / "model.onnx" if path.is_dir() else path
    if not file.is_file():
        raise LmexportError(f"{path}: no such ONNX file")
    try:
        model = onnx.load(str(file), load_external_data=False)
    except Exception as e:  # onnx raises DecodeError and others for non-ONNX input
        raise LmexportError(f"{file}: not an ONNX model ({type(e).__name__})") from None
    ops = Counter(f"{n.domain}::{n.op_type}" if n.domain else n.op_type for n in model.graph.node)
    opsets = ", ".join(f"{o.domain or 'ai.onnx'} {o.version}" for o in model.opset_import)
    click.echo(f"{file}: {len(model.graph.node)} nodes; opsets: {opsets}")
    for kind, values in (("input", model.graph.input), ("output", model.graph.output)):
        for v in values:
            dims = [d.dim_param or str(d.dim_value) for d in v.type.tensor_type.shape.dim]
            dtype = onnx.TensorProto.DataType.Name(v.type.tensor_type.elem_type).lower()
            click.echo(f"  {kind:<6} {v.name}: {dtype}[{', '.join(dims)}]")
    for op, count in ops.most_common():
        click.echo(f"  {count:>5}  {op}")


def _turn_taking(draft: Path | None, threads: int | None) -> None:
    """A target and its draft take turns: in the `lmexport` program, one pool of threads for
    both (`share_threads`); elsewhere (the process is not ours to set) threads that do not
    spin, as LlamaRunner.load(spinning=False) gives them."""
    from .runtime import share_threads

    if draft is not None and _Program.running:
        share_threads(threads)


class _Program:
    """Whether this is the `lmexport` program's own process (not a test's or an app's call)."""

    running = False


def main() -> None:
    _Program.running = True
    cli()
