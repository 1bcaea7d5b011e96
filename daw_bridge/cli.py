"""`stemquery` command line: a thin layer over the Separator API and the server."""
from __future__ import annotations

import logging
import os
import sys
from importlib.metadata import version as package_version
from pathlib import Path

import click

# Importing stemquery.model sets OMP_WAIT_POLICY=PASSIVE before torch loads (2x faster on 2 cores).
from stemquery.daw_bridge.jobs import SeparationRequest, parse_device, range_problem, run_separation
from stemquery.model import DEFAULT_ENGINE, StemqueryError, available_engines
from stemquery.model.api import resolve_device
from stemquery.model.evaluate import QUERY_SOURCES

VERSION = package_version("stemquery")


def parse_range(text: str) -> tuple[float, float]:
    try:
        start, end = (float(part) for part in text.split(":"))
    except ValueError:
        raise click.BadParameter(f"{text!r} is not START:END in seconds, e.g. 12.5:16") from None
    if problem := range_problem(start, end):
        raise click.BadParameter(problem)
    return start, end


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(VERSION, prog_name="stemquery")
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
def main(verbose: int) -> None:
    """Audio-query source separation: give a mix and an example of a sound, get that sound as a stem."""
    logging.basicConfig(
        level=[logging.WARNING, logging.INFO, logging.DEBUG][min(verbose, 2)],
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


@main.command()
@click.argument("mix", type=click.Path(path_type=Path))
@click.option("-q", "--query", "queries", multiple=True, type=click.Path(path_type=Path),
              help="A clip of the wanted sound (repeat for several).")
@click.option("--query-range", "query_ranges", multiple=True, type=parse_range,
              help="START:END seconds of the mix where the wanted sound is exposed (repeatable).")
@click.option("--stem", "stems", multiple=True, metavar="NAME[=CLIP|=@START:END]",
              help="A stem to separate (repeatable; all in one pass): NAME=CLIP takes that clip as its example "
                   "(repeat a NAME for several clips), NAME=@12.5:16 a range of the mix, a bare NAME the bundled "
                   "examples of that instrument (`stemquery instruments`).")
@click.option("-o", "--out-dir", type=click.Path(path_type=Path), default=None,
              help="Output folder [default: the mix's folder].")
@click.option("--engine", default=DEFAULT_ENGINE, show_default=True)
@click.option("--format", "container", type=click.Choice(["wav", "flac"]), default="wav", show_default=True)
@click.option("--bit-depth", type=click.Choice(["16", "24", "32"]), default=None,
              help="[default: 32 (float) for WAV, 24 for FLAC]")
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda")
@click.option("--refine/--no-refine", default=False, show_default=True,
              help="Run the diffusion refiner after the separator (bsmamba engine).")
@click.option("--steps", type=click.IntRange(1, 100), default=None,
              help="Refiner diffusion steps [default: the refiner's own, 1 for the shipped refiner-v3].")
@click.option("--allow-truncated", is_flag=True,
              help="Read a WAV whose data is shorter than its header says (refused by default).")
def separate(mix, queries, query_ranges, stems, out_dir, engine, container, bit_depth, device, refine, steps,
             allow_truncated) -> None:
    """Separate the sound the queries describe from MIX (stem `target`), or every --stem in one pass; write each
    stem and the residual (everything else: the files add up to the mix)."""
    from tqdm import tqdm

    from stemquery.daw_bridge.spec import stem_requests

    if not queries and not query_ranges and not stems:
        raise click.UsageError("give --query CLIP, --query-range START:END or --stem NAME[=CLIP]")
    try:
        stem_list = stem_requests(list(stems))
    except StemqueryError as exc:
        raise click.BadParameter(str(exc), param_hint="--stem") from None
    request = SeparationRequest(
        mix=mix,
        queries=list(queries),
        query_ranges=list(query_ranges),
        out_dir=out_dir or mix.parent,
        engine=engine,
        container=container,
        bit_depth=int(bit_depth) if bit_depth else None,
        refine=refine,
        steps=steps,
        allow_truncated=allow_truncated,
        stems=stem_list,
    )
    bars: list[tqdm] = []  # created on the first report, so input errors print without a bar

    def progress(fraction: float, stage: str) -> None:
        if not bars:
            bars.append(tqdm(total=100, unit="%", file=sys.stderr, desc="stemquery", leave=False,
                             bar_format="{desc}: {percentage:3.0f}%|{bar}| {postfix}"))
        bars[0].n = round(100 * fraction)
        bars[0].set_postfix_str(stage)

    try:
        from stemquery.model import Separator

        separator = Separator(engine, device=parse_device(device), **request.engine_options)
        result = run_separation(separator, request, progress=progress)
    except StemqueryError as exc:
        raise click.ClickException(str(exc)) from None
    finally:
        for bar in bars:
            bar.close()
    for warning in result.warnings:
        click.echo(f"Warning: {warning}", err=True)
    for path in result.paths.values():
        click.echo(path)


@main.command()
def instruments() -> None:
    """List the instrument names with bundled example clips (for `--stem NAME`), their aliases and families."""
    from stemquery.model.instruments import family_members, instrument_names

    for entry in instrument_names():
        members = "" if entry.kind == "instrument" else "  = " + ", ".join(family_members(entry))
        aliases = f"  (also: {', '.join(entry.aliases)})" if entry.aliases else ""
        click.echo(f"{entry.name:<18} {entry.kind:<10}{members}{aliases}")


@main.command()
def engines() -> None:
    """List the installed engines, which one is the default, and the device they would run on."""
    device = resolve_device("auto")
    for info in available_engines():
        mark = "*" if info.name == DEFAULT_ENGINE else " "
        state = "ready" if info.available else f"unavailable: {info.reason}"
        click.echo(f"{mark} {info.name:<10} {info.sample_rate} Hz  {state}  ({info.description})")
    click.echo(f"device: {device}  (* = default engine)")


@main.command()
@click.option("--host", default=None, help="Address to listen on [default: 127.0.0.1, this machine only].")
@click.option("--osc-port", type=int, default=None, help="UDP and TCP port for OSC [default: 9130].")
@click.option("--hotfolder", "hotfolders", multiple=True, type=click.Path(path_type=Path),
              help="Watched folder (repeatable) [default: ~/stemquery].")
@click.option("--allow-root", "allow_roots", multiple=True, type=click.Path(path_type=Path),
              help="A folder jobs may read from and write to, besides the hot folders (repeatable).")
@click.option("--device", default=None, help="auto, cpu or cuda [default: auto].")
@click.option("--engine", default=None, help=f"Default engine [default: {DEFAULT_ENGINE}].")
@click.option("--max-duration", "max_duration_s", type=float, default=None, help="Longest input, seconds [1200].")
@click.option("--max-file-mb", type=float, default=None, help="Largest input file, MB [1024].")
@click.option("--wait-timeout", "wait_timeout_s", type=float, default=None,
              help="Seconds a hot-folder file may wait for its pair, or to be complete, before it goes to failed/ "
                   "[600].")
@click.option("--poll", is_flag=True, default=None, help="Poll the hot folders (network shares).")
@click.option("--journal", type=click.Path(path_type=Path), default=None, help="Job journal (SQLite) path.")
@click.option("--config", "config_file", type=click.Path(path_type=Path), default=None,
              help="TOML file with any of these settings.")
def serve(config_file, **options) -> None:
    """Run the server: engines stay loaded; jobs come from OSC and hot folders."""
    from stemquery.daw_bridge.config import load_config
    from stemquery.daw_bridge.server import StemqueryServer

    logging.getLogger().setLevel(min(logging.getLogger().level, logging.INFO))
    try:
        config = load_config(config_file).with_overrides(
            **{k: (tuple(v) if isinstance(v, tuple) else v) for k, v in options.items()})
        server = StemqueryServer(config)
    except (StemqueryError, OSError) as exc:
        raise click.ClickException(str(exc)) from None
    server.serve_forever()


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--osc-port", type=int, default=9130, show_default=True)
@click.option("--timeout", type=float, default=2.0, show_default=True)
def status(host, osc_port, timeout) -> None:
    """Ask a running server for its queue, device and engines."""
    from stemquery.daw_bridge.client import OscClient

    with OscClient(host, osc_port) as client:
        client.send("/stemquery/status", "cli")
        reply = client.wait_for("/stemquery/status", timeout=timeout)
    if reply is None:
        raise click.ClickException(f"no stemquery server answered on {host}:{osc_port}; start one with `stemquery serve`")
    _, queue, device, engines, running = reply
    click.echo(f"server on {host}:{osc_port}: device {device}, engines {engines}, "
               f"{queue} job(s) queued or running{', running ' + running if running else ''}")


@main.group()
def data() -> None:
    """Build training data and eval sets (needs fluidsynth, the SoundFonts and mma from Debian: see docs)."""


@data.command()
@click.option("--root", type=click.Path(path_type=Path), default=Path("data"), show_default=True)
@click.option("--workers", type=int, default=2, show_default=True)
@click.option("--only", multiple=True, help="Only this render or eval set (train, val, val_unseen, test, eval_val, "
                                            "eval_val_unseen, eval_test); repeatable.")
def prepare(root, workers, only) -> None:
    """Everything training and evaluation need, with the documented seeds (resumable: done steps are skipped)."""
    from stemquery.model.data.prepare import prepare as prepare_data

    ran = prepare_data(root, workers=workers, only=tuple(only))
    click.echo(f"prepared {', '.join(ran) if ran else 'nothing (all present)'} under {root}")


@data.command()
@click.option("--corpus", type=click.Path(path_type=Path, exists=True, file_okay=False), default=Path("data/train"),
              show_default=True, help="A rendered corpus.")
@click.option("--out", type=click.Path(path_type=Path), required=True)
@click.option("--tracks", type=click.IntRange(min=1), default=90, show_default=True,
              help="Evenly spaced tracks to keep.")
@click.option("--seconds", type=click.FloatRange(min=1.0), default=7.0, show_default=True,
              help="Excerpt of each track (where most of its stems play).")
@click.option("--compression", type=click.FloatRange(0.0, 1.0), default=0.6, show_default=True,
              help="Ogg Vorbis compression level (0: best quality, 1: smallest).")
def pack(corpus, out, tracks, seconds, compression) -> None:
    """A small compressed excerpt of a corpus (Vorbis stems), for training on a machine the corpus cannot reach."""
    from stemquery.model.data.pack import PackConfig, pack_corpus

    try:
        count, size = pack_corpus(PackConfig(corpus=corpus, out=out, tracks=tracks, seconds=seconds,
                                             compression=compression))
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"{count} tracks, {size / 2**20:.1f} MiB → {out}")


@data.command("cache-music21")
@click.option("--out", type=click.Path(path_type=Path), default=Path("data/midi_music21"), show_default=True)
@click.option("--workers", type=int, default=2, show_default=True)
def cache_music21(out, workers) -> None:
    """Parse the music21 corpus once and cache its multi-part works as MIDI (resumable)."""
    from stemquery.model.data.corpus import cache_music21_corpus

    names = cache_music21_corpus(out, workers=workers)
    click.echo(f"{len(names)} MIDI files in {out}")


@data.command()
@click.option("--out", type=click.Path(path_type=Path), required=True)
@click.option("--timbres", type=click.Choice(["train", "val", "val_unseen", "test"]), required=True,
              help="train: training music and timbres; val: held-out music, training SoundFonts; val_unseen: "
                   "held-out music, timbres held out of training; test: held-out music, reserved SoundFonts.")
@click.option("--hours", type=float, required=True, help="Hours of mixtures to render.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--sample-rate", type=int, default=44100, show_default=True)
@click.option("--workers", type=int, default=2, show_default=True)
@click.option("--midi-cache", type=click.Path(path_type=Path), default=Path("data/midi_music21"), show_default=True)
@click.option("--mma-share", type=float, default=0.5, show_default=True, help="Share of tracks from MMA grooves.")
@click.option("--soundfont", "soundfonts", multiple=True, type=click.Path(path_type=Path),
              help="Use only these SoundFonts (must belong to the split).")
def render(out, timbres, hours, seed, sample_rate, workers, midi_cache, mma_share, soundfonts) -> None:
    """Render a multitrack corpus: per track, one FLAC stem per part and their mix."""
    import time as _time

    from stemquery.model.data.render import SOUNDFONTS, RenderConfig, render_dataset

    allowed = {p.name for p in SOUNDFONTS[timbres]}
    bad = [p for p in soundfonts if p.name not in allowed]
    if bad:
        raise click.ClickException(f"{bad[0]} is not a {timbres} SoundFont (allowed: {', '.join(sorted(allowed))})")
    config = RenderConfig(out=out, timbres=timbres, hours=hours, seed=seed, sample_rate=sample_rate,
                          workers=workers, midi_cache=midi_cache, mma_share=mma_share,
                          soundfonts=tuple(soundfonts) or None)
    started = _time.perf_counter()
    metas = render_dataset(config)
    minutes = (_time.perf_counter() - started) / 60
    stem_hours = sum(len(m["stems"]) * m["seconds"] for m in metas) / 3600
    click.echo(f"{len(metas)} tracks, {stem_hours:.2f} stem-hours in {minutes:.1f} min "
               f"({stem_hours / minutes:.2f} stem-hours/min) → {out}")


@data.command()
@click.option("--corpus", type=click.Path(path_type=Path, exists=True), required=True,
              help="A rendered corpus (stemquery data render) of the same timbres.")
@click.option("--out", type=click.Path(path_type=Path), required=True)
@click.option("--cases", type=int, default=120, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--segment", type=float, default=10.0, show_default=True, help="Mixture length, seconds.")
@click.option("--query-length", type=float, default=4.0, show_default=True, help="Query length, seconds.")
def evalset(corpus, out, cases, seed, segment, query_length) -> None:
    """Build an eval set: case_NNN/{mixture,query,target}.flac + meta.json, query protocols in turn."""
    from stemquery.model.evaluate import build_evalset

    n = build_evalset(corpus, out, cases=cases, seed=seed, segment_s=segment, query_s=query_length)
    click.echo(f"{n} cases → {out}")


@main.command("eval")
@click.argument("eval_set", type=click.Path(path_type=Path, exists=True, file_okay=False))
@click.option("--engine", "engines", multiple=True,
              help="Engine(s) to score, NAME or NAME:key=value,... (e.g. bsmamba:refine=1,steps=5); mix, nmf and "
                   "irm always are.")
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Write results.json and results.md here [default: EVAL_SET/results].")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Only the first N cases.")
@click.option("--device", default="cpu", show_default=True)
@click.option("--recompute", is_flag=True,
              help="Ignore per-engine results cached under OUT/cache (after a code change: the cache is keyed by "
                   "weights and options, not by code).")
@click.option("--query-from", type=click.Choice(QUERY_SOURCES), default="clip", show_default=True,
              help="The engines' query: each case's query clip, its clean target (the perfect example: does the "
                   "engine match it?), or its instrument's name (the bundled examples; nmf keeps the clip) "
                   "[results then default to EVAL_SET/results_target or results_name].")
def evaluate_command(eval_set, engines, out, limit, device, recompute, query_from) -> None:
    """Score engines on an eval set: SNR, SI-SDR, SDR and their improvement over the mix, and RTF.

    Each engine's results are cached per configuration/weights, so after training only the new model runs."""
    import json as _json

    from tqdm import tqdm

    from stemquery.model.evaluate import case_folders, evaluate, markdown_report

    if not case_folders(eval_set):
        raise click.ClickException(f"{eval_set}: no cases to score (no case_NNN/ folder with a meta.json); build an "
                                   "eval set with `stemquery data evalset`")

    bar = tqdm(total=None, desc="eval", unit="case", file=sys.stderr)

    def progress(done: int, total: int) -> None:
        bar.total = total
        bar.update(done - bar.n)

    out = out or eval_set / ("results" if query_from == "clip" else f"results_{query_from}")
    try:
        result = evaluate(eval_set, list(engines), device=device, limit=limit, progress=progress,
                          cache=None if recompute else out / "cache", query_from=query_from)
    except StemqueryError as exc:
        raise click.ClickException(str(exc)) from None
    finally:
        bar.close()
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(_json.dumps(result, indent=1))
    report = markdown_report(result)
    (out / "results.md").write_text(report)
    click.echo(report)


@main.group()
def train() -> None:
    """Train the learned engines (long jobs: run them in the background, they checkpoint and resume)."""


def _train_options(command):
    command = click.option("--threads", type=click.IntRange(min=1), default=None,
                           help="CPU threads (overrides the config; two runs side by side: 1 each).")(command)
    command = click.option("--minutes", type=float, default=None,
                           help="Stop after this long (overrides the config).")(command)
    command = click.option("--resume", type=click.Path(path_type=Path, exists=True), default=None,
                           help="A checkpoint (RUN/last.pt), or committed weights (.safetensors with its .json, "
                                "e.g. checkpoints/bsmamba-v3/last.safetensors), to continue from.")(command)
    return click.option("--config", "config_file", type=click.Path(path_type=Path, exists=True),
                        required=True)(command)


def _run_training(trainer_class, config_class, config_file: Path, resume: Path | None, minutes: float | None,
                  threads: int | None = None) -> None:
    import dataclasses

    logging.getLogger().setLevel(min(logging.getLogger().level, logging.INFO))
    config = config_class.load(config_file)
    overrides = {"minutes": minutes, "threads": threads}
    config = dataclasses.replace(config, **{k: v for k, v in overrides.items() if v is not None})
    trainer = trainer_class(config)
    if resume:
        trainer.resume(resume)
    trainer.run()


@train.command("separator")
@_train_options
def train_separator(config_file, resume, minutes, threads) -> None:
    """Train the band-split Mamba separator on a rendered corpus."""
    from stemquery.model.train import SeparatorTrainConfig, SeparatorTrainer

    _run_training(SeparatorTrainer, SeparatorTrainConfig, config_file, resume, minutes, threads)


@train.command("vae")
@_train_options
def train_vae(config_file, resume, minutes, threads) -> None:
    """Train the refiner's timbre/pitch VAE on a rendered corpus's stems."""
    from stemquery.model.train_refiner import VAETrainConfig, VAETrainer

    _run_training(VAETrainer, VAETrainConfig, config_file, resume, minutes, threads)


@train.command("refiner")
@_train_options
def train_refiner(config_file, resume, minutes, threads) -> None:
    """Train the latent diffusion refiner over a trained VAE and separator."""
    from stemquery.model.train_refiner import RefinerTrainConfig, RefinerTrainer

    _run_training(RefinerTrainer, RefinerTrainConfig, config_file, resume, minutes, threads)


@train.command("export")
@click.argument("checkpoint", type=click.Path(path_type=Path, exists=True))
@click.option("--out", type=click.Path(path_type=Path), required=True,
              help="Weights path without suffix, e.g. model/weights/bsmamba-v7")
def train_export(checkpoint, out) -> None:
    """Write a training checkpoint as shipped weights (.safetensors + .json)."""
    from stemquery.model.export import export

    export(checkpoint, out)
    click.echo(f"{out}.safetensors, {out}.json")


@train.command("curve")
@click.argument("runs", nargs=-1, required=True, type=click.Path(path_type=Path, exists=True, file_okay=False))
@click.option("--metric", default="si_sdr_i", show_default=True, help="The validation figure to plot.")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="PNG to write.")
def train_curve(runs, metric, out) -> None:
    """Plot the validation curve (RUN/curve.json) of one or more training runs against steps."""
    from stemquery.model.training_loop import plot_curves

    try:
        plot_curves(list(runs), metric, out)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(str(out))


def default_reaper_resource_path() -> Path:
    """Where REAPER keeps its resources (Options > Show REAPER resource path) on this system."""
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Application Support" / "REAPER"
    if sys.platform.startswith("win"):
        return Path(os.environ.get("APPDATA", Path.home())) / "REAPER"
    return Path.home() / ".config" / "REAPER"


@main.command("install-reaper")
@click.option("--resource-path", type=click.Path(path_type=Path), default=None,
              help="REAPER's resource folder [default: this system's usual one].")
def install_reaper(resource_path) -> None:
    """Copy the stemquery ReaScripts into REAPER's Scripts folder and say how to add them to the menus."""
    import shutil
    from importlib.resources import files

    resource_path = resource_path or default_reaper_resource_path()
    if not resource_path.is_dir():
        raise click.ClickException(f"{resource_path}: no REAPER resource folder there; give it with --resource-path "
                                   "(REAPER: Options > Show REAPER resource path in explorer/finder)")
    target = resource_path / "Scripts" / "stemquery"
    target.mkdir(parents=True, exist_ok=True)
    scripts = [p for p in files("stemquery.reaper_scripts").iterdir() if p.name.endswith(".lua")]
    for script in scripts:
        shutil.copyfile(script, target / script.name)
    actions = sorted(s.name for s in scripts if s.name != "stemquery_common.lua")
    click.echo(f"Copied {len(scripts)} scripts to {target}")
    click.echo("In REAPER: Actions > Show action list > New action > Load ReaScript..., select:")
    for name in actions:
        click.echo(f"  {target / name}")
    click.echo("Then right-click the arrange view's item context menu: Customize menus/toolbars > "
               "Media item context > Add > the stemquery actions.")
    click.echo("Start the server first: stemquery serve")
