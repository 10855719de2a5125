"""`lmexport` command line: each command parses, calls the Python API, prints, sets the exit code.

Exit codes: 0 success, 1 `verify` found a parity failure, 2 bad input or usage (one line on stderr).
"""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path
from typing import Any

import click

from .errors import LmexportError


class _BadInput(click.ClickException):
    exit_code = 2

    def show(self, file: Any = None) -> None:
        click.echo(f"lmexport: error: {self.format_message()}", err=True)


class _Group(click.Group):
    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except LmexportError as e:
            if ctx.params.get("debug"):
                raise
            raise _BadInput(str(e)) from None


@click.group(cls=_Group)
@click.option("--debug", is_flag=True, help="Show tracebacks for errors.")
@click.version_option(package_name="lmexport")
def cli(debug: bool) -> None:
    """Export Llama-family and HorNet models to ONNX, run them with onnxruntime, and prove
    parity."""


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
@click.option("--seed", type=int, default=None, help="Weight seed of a preset (default 0).")
@click.option("--force", is_flag=True, help="Replace OUTDIR if it exists.")
@click.option("--arch", default=None, help="Architecture of a checkpoint file (hornet-tiny-gf, …).")
@click.option(
    "--image-size", type=int, default=None, help="HorNet input size (GF models run at this size)."
)
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
) -> None:
    """Export SOURCE (a preset name, a Hugging Face model folder or a HorNet .pth with --arch) to
    OUTDIR."""
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
    )
    click.echo(
        f"wrote {folder}/model.onnx ({target}, {dtype}{', no KV cache' if no_kv_cache else ''})"
    )


@cli.command()
@click.argument("source", type=click.Path(path_type=Path))
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path))
@click.option("--target", type=click.Choice(["ort", "onnx"]), default="ort", show_default=True)
@click.option("--report", "report_path", type=click.Path(path_type=Path), default=None)
@click.option("--no-check", is_flag=True, help="Skip the before/after parity run (huge graphs).")
@click.option("-v", "--verbose", is_flag=True, help="List refused matches and why.")
def optimize(
    source: Path, output: Path, target: str, report_path: Path | None, no_check: bool, verbose: bool
) -> None:
    """Fuse RMSNorm, rotary and grouped attention in SOURCE (an ONNX file, or a folder from
    `convert --target plain`) and write OUTPUT (a file, or a new folder)."""
    import json

    from .optimizers import optimize_file

    report = optimize_file(source, output, target, check=not no_check)
    click.echo(report.table(verbose))
    if report_path is not None:
        report_path.write_text(json.dumps(report.to_dict(), indent=2))
    click.echo(f"wrote {output}")


@cli.command()
@click.argument("folder", type=click.Path(path_type=Path))
@click.option(
    "--source", default=None, help="PyTorch source to compare with (default: lmexport.json's)."
)
@click.option("--provider", default="cpu", show_default=True)
@click.option("--steps", default=32, show_default=True, help="Greedy tokens to compare.")
@click.option("--seed", default=0, show_default=True, help="Seed of the random inputs.")
@click.option("--json", "json_path", type=click.Path(path_type=Path), default=None)
def verify(
    folder: Path, source: str | None, provider: str, steps: int, seed: int, json_path: Path | None
) -> None:
    """Compare FOLDER's model in onnxruntime with its PyTorch source on the same inputs."""
    from .verify import run_verify

    if steps < 1:
        raise LmexportError("--steps must be at least 1")
    report = run_verify(folder, source=source, provider=provider, steps=steps, seed=seed)
    click.echo(report.table())
    if json_path is not None:
        report.write_json(json_path)
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


@cli.command()
@click.argument("folder", type=click.Path(path_type=Path))
@click.option("--prompt", default=None, help="Text, encoded with the folder's tokenizer.json.")
@click.option("--ids", default=None, help="Token ids, e.g. 1,2,3.")
@click.option("--max-new-tokens", default=32, show_default=True)
@click.option("--temperature", default=0.0, show_default=True, help="0: greedy.")
@click.option("--top-k", default=0, show_default=True, help="0: off.")
@click.option("--top-p", default=1.0, show_default=True, help="1: off.")
@click.option("--min-p", default=0.0, show_default=True, help="0: off.")
@click.option("--repetition-penalty", default=1.0, show_default=True, help="1: off.")
@click.option("--seed", default=None, type=int, help="Makes a sampled generation reproducible.")
@click.option("--draft", type=click.Path(path_type=Path), default=None, help="Draft model folder.")
@click.option("--draft-tokens", default=4, show_default=True, help="Proposals per round.")
@click.option("--provider", default="cpu", show_default=True)
def generate(
    folder: Path,
    prompt: str | None,
    ids: str | None,
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
    """Continue a prompt (greedy unless --temperature > 0); prints text when FOLDER has a
    tokenizer, else ids."""
    from .runtime import LlamaRunner, load_tokenizer

    if (prompt is None) == (ids is None):
        raise LmexportError("give exactly one of --prompt and --ids")
    runner = LlamaRunner.load(folder, provider=provider)
    tokenizer = load_tokenizer(folder) if prompt is not None else None
    prompt_ids = tokenizer.encode(prompt).ids if tokenizer is not None else _parse_ids(ids or "")
    if tokenizer is None and (folder / "tokenizer.json").is_file():
        tokenizer = load_tokenizer(folder)
    produced: list[int] = []
    steps = runner.stream(
        [prompt_ids],
        max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        min_p=min_p,
        repetition_penalty=repetition_penalty,
        seed=seed,
        draft=LlamaRunner.load(draft, provider=provider) if draft is not None else None,
        draft_tokens=draft_tokens,
    )
    for step in steps:
        produced.append(int(step[0]))
        if tokenizer is None:
            click.echo(f"{produced[-1]} ", nl=False)
    if tokenizer is not None:
        click.echo(tokenizer.decode(produced), nl=False)
    click.echo()


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


def main() -> None:
    cli()
