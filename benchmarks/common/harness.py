"""What every runner shares: command-line options, the model with its beacon adapters, the methods compared,
kvpress jobs, summary records and result files.

Methods (``Method.name`` is the summary's ``method`` field; ``Method.ratio`` its ``compression``: the KV budget
is 1/ratio of the context, 1 for full attention):

- ``full``: the base model (adapter disabled), only where the whole sequence fits its native positions;
- ``beacon-untrained-r{r}`` (a fresh adapter: beacon projections are copies of the base ones) or
  ``{label}-r{r}`` for every ``--adapter [LABEL=]PATH``;
- ``kvpress-{press}-{1 - 1/r}`` (e.g. ``kvpress-snapkv-0.875``), run by the kvpress worker in its own venv on
  the same weights; a press compresses after a full-attention prefill, so it runs where ``full`` does.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from . import metrics

BENCH_ROOT = Path(__file__).resolve().parents[1]
PRESSES = ("snapkv", "streamingllm", "knorm", "expected_attention")
from beacon_peft.config import BeaconConfig  # noqa: E402
from beacon_peft.precision import DTYPE_NAMES, resolve_dtype  # noqa: E402
from beacon_peft.training.modeling import LORA_DIR  # noqa: E402
from beacon_peft.training.trained import load_trained  # noqa: E402


@dataclass(frozen=True)
class Method:
    name: str
    kind: str  # "full" | "beacon" | "kvpress"
    ratio: int = 1
    adapter: str | None = None
    press: str | None = None

    @property
    def compression_ratio(self) -> float:
        """kvpress's ``compression_ratio`` for the same budget: the fraction of the KV cache removed."""
        return round(1.0 - 1.0 / self.ratio, 6)

    @property
    def family(self) -> str:
        """The method without its ratio (``beacon-untrained``, ``kvpress-snapkv``, ``full``), for ratio sweeps."""
        if self.kind == "beacon":
            return self.name.rsplit("-r", 1)[0]
        return f"kvpress-{self.press}" if self.kind == "kvpress" else self.name


def press_method(press: str, ratio: int) -> Method:
    """A kvpress press at the KV budget of ratio ``ratio`` (``compression_ratio = 1 - 1/ratio``)."""
    return Method(f"kvpress-{press}-{Method('', 'kvpress', ratio).compression_ratio:g}", "kvpress", ratio, press=press)


def with_overrides(settings, **values):
    """``settings`` (a dataclass of a mode's defaults) with the command-line values that were given."""
    return replace(settings, **{k: v for k, v in values.items() if v is not None})


def provenance(header: dict, **settings) -> dict:
    """What full attention's figures depend on, from a result header (`Bench.header`): model folder, hardware,
    dtype, device, threads, seed, torch / transformers versions, and the benchmark's own ``settings`` given by
    keyword (stored as ``settings.<name>``). Two results whose provenance is equal computed full attention alike."""
    out = {f: header.get(f) for f in ("model_dir", "hardware", "dtype", "device", "threads", "seed")}
    out |= {f"versions.{lib}": (header.get("versions") or {}).get(lib) for lib in ("torch", "transformers")}
    return out | {f"settings.{name}": value for name, value in settings.items()}


def earlier_result(path: Path, benchmark: str, header: dict, settings: dict, holds: str) -> dict:
    """An earlier result file of ``benchmark`` for ``--full-from``, checked: it holds the list ``holds`` and its
    `provenance` (header fields and the named ``settings``) equals this run's (``header``, ``settings``).

    Raises:
        ValueError: unreadable, not such a result, or made with other settings (each difference named).
    """
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"--full-from {path}: not a readable result file ({exc})") from None
    if not (isinstance(data, dict) and isinstance(data.get("settings"), dict) and isinstance(data.get(holds), list)):
        raise ValueError(f"--full-from {path}: not a {benchmark} result (no {holds} and settings)")
    wanted = provenance(header, **settings)
    stored = provenance(data, **{name: data["settings"].get(name) for name in settings})
    differ = {f: (stored[f], wanted[f]) for f in wanted if stored[f] != wanted[f]}
    if differ:
        raise ValueError(f"--full-from {path}: made with other settings, its full-attention figures may differ: "
                         + "; ".join(f"{f} {a!r} there, {b!r} here" for f, (a, b) in differ.items()))
    return data


def add_common_args(parser: argparse.ArgumentParser) -> None:
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", dest="mode", action="store_const", const="quick",
                      help="short contexts and few samples, sized for a CPU with SmolLM2-135M (default; times in "
                      "docs/benchmarks.md)")
    mode.add_argument("--full", dest="mode", action="store_const", const="full",
                      help="long contexts (up to 128K tokens) and more samples: meant for a GPU")
    mode.add_argument("--long", dest="mode", action="store_const", const="long",
                      help="8K-32K tokens, one sample per cell: a trained adapter's figures on a CPU")
    parser.set_defaults(mode="quick")
    parser.add_argument("--model", default=None,
                        help="transformers model folder with its tokenizer (default: offline SmolLM2-135M)")
    parser.add_argument("--adapter", action="append", default=[], metavar="[LABEL=]PATH",
                        help="beacon adapter folder (repeatable); default: a fresh untrained adapter")
    parser.add_argument("--with-untrained", action="store_true",
                        help="also run a fresh UNTRAINED adapter with the first --adapter's settings, side by side")
    parser.add_argument("--ratios", type=int, nargs="+", default=[8], help="compression ratios (default 8)")
    parser.add_argument("--window", type=int, default=1024, help="window of the fresh adapter (default 1024)")
    parser.add_argument("--presses", nargs="*", default=list(PRESSES), choices=PRESSES,
                        help="kvpress presses (default: all four)")
    parser.add_argument("--no-kvpress", action="store_true", help="skip the kvpress presses")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=list(DTYPE_NAMES),
                        help="float32 (default), bfloat16, float16, or auto: bfloat16 where the device has native bf16")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--out-root", type=Path, default=BENCH_ROOT,
                        help="write <out-root>/<benchmark>/results/ and <out-root>/results/summary.jsonl")
    parser.add_argument("--tag", default=None,
                        help="name of the result files (default: the mode, quick or full): <tag>.json, <tag>.md, ...")


def command_line() -> str:
    """The command that started this process, as typed at the repository root: ``python -m benchmarks.x.run ARGS``
    for a runner started as a module (``sys.argv[0]`` is then the file's full path), else ``python ARGV``."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    program = ["-m", spec.name] if spec is not None and spec.name not in ("", "__main__") else sys.argv[:1]
    return " ".join(["python", *program, *sys.argv[1:]])


def runner_main(argv, description: str, add_args, settings_from, run, extra_ratios=lambda settings: ()) -> int:
    """The command line of one benchmark runner: the common options plus its own (``add_args(parser)``), its
    settings (``settings_from(args)``), the model loaded once (with ``extra_ratios(settings)`` besides
    ``--ratios``), ``run(bench, settings)`` printed, and the summary appended."""
    parser = argparse.ArgumentParser(description=description)
    add_common_args(parser)
    add_args(parser)
    args = parser.parse_args(argv)
    settings = settings_from(args)
    bench = Bench(args, extra_ratios=tuple(extra_ratios(settings)))
    print(run(bench, settings))
    print(f"summary appended to {bench.flush_summary()}")
    return 0


def parse_adapters(specs: list[str]) -> list[tuple[str, Path]]:
    """``[LABEL=]PATH`` -> (label, path); unlabelled: ``beacon`` alone, else ``beacon-<folder name>``."""
    out = []
    for spec in specs:
        label, sep, path = spec.partition("=")
        if not sep:
            path = label
            label = "beacon" if len(specs) == 1 else f"beacon-{Path(path).name}"
        if not (Path(path) / "adapter_config.json").is_file():
            raise SystemExit(f"--adapter {spec}: {path} has no adapter_config.json")
        out.append((label, Path(path)))
    if len({label for label, _ in out}) != len(out):
        raise SystemExit(f"--adapter labels must differ: {[label for label, _ in out]}")
    return out


def check_base_lora(adapters: list[tuple[str, Path]], with_untrained: bool) -> None:
    """An adapter folder holding a LoRA of the base (``base_lora/``, `recipes/train_readback.py --base_lora_r`) is
    measured with that LoRA under its beacons; the LoRA changes the raw-token path every beacon adapter of the run
    would share, so such an adapter must be the only one, without ``--with-untrained`` (SystemExit otherwise).
    Full attention stays the plain base: disabling the adapter disables the LoRA too."""
    carrying = [label for label, path in adapters if (path / LORA_DIR).is_dir()]
    if carrying and (len(adapters) > 1 or with_untrained):
        raise SystemExit(f"--adapter {carrying[0]} holds a base LoRA ({LORA_DIR}/): it must be the only adapter of "
                         f"a run and without --with-untrained (given: {[label for label, _ in adapters]}"
                         f"{', --with-untrained' if with_untrained else ''})")


class Bench:
    """The loaded model (one PEFT model holding every beacon adapter), tokenizer, options and the records of
    one run. ``extra_ratios`` are ratios some benchmark sweeps besides ``--ratios``."""

    def __init__(self, args: argparse.Namespace, extra_ratios: tuple[int, ...] = ()):
        from peft import get_peft_model
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from transformers.utils import logging as hf_logging

        import beacon_peft  # importing registers the BEACON adapter type with PEFT

        hf_logging.disable_progress_bar()
        self.args = args
        if args.threads:
            torch.set_num_threads(args.threads)
        if args.model is None:
            from beacon_peft.offline.weights import smollm2_dir

            args.model = str(smollm2_dir())
        self.model_dir = Path(args.model)
        self.model_name = self.model_dir.name
        self.device = torch.device(args.device)
        self.dtype = resolve_dtype(args.dtype, args.device)
        self.dtype_name = str(self.dtype).removeprefix("torch.")  # what "auto" resolved to
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        torch.manual_seed(args.seed)
        base = AutoModelForCausalLM.from_pretrained(self.model_dir, dtype=self.dtype).to(self.device).eval()
        self.config = base.config
        self.native_positions = int(getattr(base.config, "max_position_embeddings", 0) or 0)
        self.ratios = sorted(set(args.ratios))
        self.adapters = parse_adapters(args.adapter)
        if self.adapters:
            (label, path), rest = self.adapters[0], self.adapters[1:]
            check_base_lora(self.adapters, args.with_untrained)
            # an adapter's base LoRA, unmerged: disabling the adapter (full attention) disables it too
            model = load_trained(path, base_model=base, merge_lora=False, adapter_name=label)
            for label, path in rest:
                model.load_adapter(path, adapter_name=label)
            if args.with_untrained:  # same window / ratios / sink, beacon weights fresh
                fresh = copy.deepcopy(model.peft_config[self.adapters[0][0]])
                model.add_adapter("untrained", fresh)
        else:
            config = beacon_peft.BeaconConfig(window=args.window, ratios=sorted(set(self.ratios) | set(extra_ratios)))
            model = get_peft_model(base, config, adapter_name="untrained")
        self.model = model.eval()
        self.records: list[dict] = []
        self.hardware = metrics.hardware_string()
        self.git_commit = metrics.git_commit()
        self._kvpress_reason: str | None = "disabled with --no-kvpress" if args.no_kvpress else None
        self._kvpress_checked = args.no_kvpress

    # --- methods ------------------------------------------------------------------------------------------
    def beacon_methods(self, ratios: list[int]) -> list[Method]:
        """One method per (adapter, ratio) the adapter supports."""
        out = []
        for name, config in self.model.peft_config.items():
            if not isinstance(config, BeaconConfig):
                continue  # an adapter's base LoRA (check_base_lora): it runs under that adapter's beacons
            label = "beacon-untrained" if name == "untrained" else name
            supported = [r for r in ratios if r in config.ratios]
            if len(supported) < len(ratios):
                print(f"[benchmarks] adapter {label} has ratios {config.ratios}: skipping ratio(s) "
                      f"{sorted(set(ratios) - set(supported))}", file=sys.stderr)
            out += [Method(f"{label}-r{r}", "beacon", r, adapter=name) for r in supported]
        return out

    def press_methods(self, ratios: list[int]) -> list[Method]:
        return [] if self.args.no_kvpress else [press_method(p, r) for r in ratios for p in self.args.presses]

    def fits(self, n_tokens: int) -> bool:
        """Whether ``n_tokens`` fit the base model's native positions (where full attention / kvpress run)."""
        return not self.native_positions or n_tokens <= self.native_positions

    @contextlib.contextmanager
    def use(self, method: Method):
        """Run the model as ``method`` (full attention or a beacon adapter at its ratio) inside the block."""
        if method.kind == "full":
            with self.model.disable_adapter():
                yield self.model
        elif method.kind == "beacon":
            self.model.set_adapter(method.adapter)
            self.model.base_model.set_compression_ratio(method.ratio, adapter_name=method.adapter)
            yield self.model
        else:
            raise ValueError(f"{method.name} runs in the kvpress worker, not in this process")

    # --- kvpress ------------------------------------------------------------------------------------------
    def kvpress(self, measurements: list[dict]) -> dict | None:
        """Run kvpress measurements (worker schema) on the same weights, or None (reason printed once)."""
        from .kvpress_env import kvpress_unavailable_reason, run_kvpress_job

        if not measurements:
            return None
        if not self._kvpress_checked:
            self._kvpress_reason = kvpress_unavailable_reason()
            self._kvpress_checked = True
            if self._kvpress_reason:
                print(f"[benchmarks] skipping kvpress: {self._kvpress_reason}", file=sys.stderr)
        if self._kvpress_reason:
            return None
        job = dict(model_dir=str(self.model_dir), dtype=self.dtype_name, threads=torch.get_num_threads(),
                   measurements=measurements)
        return run_kvpress_job(job)

    # --- results ------------------------------------------------------------------------------------------
    def record(self, benchmark: str, method: Method, context_tokens: int, metric: str, value) -> None:
        self.records.append(metrics.summary_record(benchmark, method.name, method.ratio, context_tokens, metric,
                                                   value, self.model_name, self.hardware, self.git_commit))

    def header(self) -> dict:
        """Provenance for result files."""
        import peft
        import transformers

        from .kvpress_env import kvpress_versions

        return dict(mode=self.args.mode, model=self.model_name, model_dir=str(self.model_dir),
                    hardware=self.hardware, git_commit=self.git_commit, seed=self.args.seed,
                    device=str(self.device), dtype=self.dtype_name, threads=torch.get_num_threads(),
                    adapters={name: (str(path)) for name, path in self.adapters} or "untrained",
                    versions=dict(torch=torch.__version__, transformers=transformers.__version__,
                                  peft=peft.__version__, kvpress=None if self.args.no_kvpress else kvpress_versions()))

    def describe(self) -> str:
        """Markdown lines saying what ran where (for the top of a results table)."""
        kv = "" if self.args.no_kvpress else f", kvpress {(self.header()['versions']['kvpress'] or {}).get('kvpress')}"
        if kv and self.device.type != "cpu":
            kv += " (its worker runs on the CPU: the job schema has no device)"
        return (f"- command: `{command_line()}`\n"
                f"- model: `{self.model_name}` ({self.dtype_name}, {self.device}, {torch.get_num_threads()} threads), "
                f"native positions {self.native_positions}\n"
                f"- beacon adapters: {self._adapters_text()}\n"
                f"- hardware: {self.hardware}; commit `{self.git_commit}`; seed {self.args.seed}{kv}\n")

    def _adapters_text(self) -> str:
        cfgs = self.model.peft_config
        if not self.adapters:
            return (f"a fresh UNTRAINED adapter (beacon projections = copies of the base ones), window "
                    f"{cfgs['untrained'].window}")
        text = ", ".join(f"`{label}` = `{path}` (window {cfgs[label].window}, ratios {cfgs[label].ratios}"
                         + (f"; with its base LoRA `{LORA_DIR}/` under the beacons, off for full attention"
                            if (path / LORA_DIR).is_dir() else "") + ")"
                         for label, path in self.adapters)
        if "untrained" in cfgs:
            text += f"; `beacon-untrained`: a fresh UNTRAINED adapter with `{self.adapters[0][0]}`'s settings"
        return text

    def results_dir(self, benchmark: str) -> Path:
        path = Path(self.args.out_root) / benchmark / "results"
        path.mkdir(parents=True, exist_ok=True)
        return path

    @property
    def stem(self) -> str:
        """Name of this run's result files: ``--tag``, else the mode."""
        return self.args.tag or self.args.mode

    def write(self, benchmark: str, payload: dict, markdown: str) -> Path:
        """``<stem>.json`` (header + payload) and ``<stem>.md`` in the benchmark's results folder."""
        out = self.results_dir(benchmark)
        (out / f"{self.stem}.json").write_text(json.dumps({**self.header(), **payload}, indent=1) + "\n")
        (out / f"{self.stem}.md").write_text(markdown)
        return out

    def flush_summary(self) -> Path:
        """Append this run's records to ``<out-root>/results/summary.jsonl`` (once)."""
        path = Path(self.args.out_root) / "results" / "summary.jsonl"
        metrics.append_summary(path, self.records)
        self.records = []
        return path
