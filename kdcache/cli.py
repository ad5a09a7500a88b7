"""The `kdcache` command line: parses options, builds the config, calls the stage. No logic here.

Every user error ends as one line on stderr and exit status 2.
"""
from __future__ import annotations

import errno
import json
import sys

import click

from kdcache.errors import KDCacheError


def _given(options: dict) -> dict:
    """Flags the user actually passed (click gives None or () for the rest)."""
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in options.items() if v is not None and v != ()}


def _config(cls, config_file, options):
    from kdcache.config import read_yaml, resolve

    file_values = read_yaml(config_file) if config_file else {}
    return resolve(cls, file_values=file_values, overrides=_given(options), source=config_file or "options")


config_option = click.option("--config", "config_file", type=click.Path(), help="YAML file of options; flags override it.")


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="kdcache")
def cli():
    """Offline knowledge distillation: dump a teacher's outputs once, train many students from them."""


@cli.command("dump-teacher")
@click.option("--teacher", help="kdcache checkpoint (OUT/<student>/model.pt) or model name (with --weights).")
@click.option("--weights", type=click.Path(), help="State dict for a teacher given by name.")
@click.option("--dataset", help="digits, fake[:size=N,classes=C,image=S], cifar10, ..., imagefolder:PATH, module:callable.")
@click.option("--data-root", type=click.Path(), help="Folder holding the dataset (never downloaded).")
@click.option("--split", "splits", multiple=True, help="Split to dump; repeat for several (default: train and test).")
@click.option("--out", help="Store to write: PATH.zarr (Zarr v3) or PATH.h5 (HDF5).")
@click.option("--activation", "activations", multiple=True, help="Teacher module to store, NAME[:full|attention|pool]; repeatable.")
@click.option("--dtype", type=click.Choice(["float16", "bfloat16", "float32", "int8", "uint8"]),
              help="Storage dtype of logits and activations (default float16; int8: logits quantized per row; "
                   "uint8: --topk values as 8-bit codes of their log-probabilities).")
@click.option("--topk", type=int, help="Keep the K largest logits per view, with their classes and the logsumexp.")
@click.option("--topk-indices", type=click.Choice(["plain", "packed"]),
              help="Class indices of --topk/--sample: plain integers (default) or packed, ceil(log2 C) bits each.")
@click.option("--sample", type=int, help="Store S classes drawn per view from the tempered teacher (random-sampling KD).")
@click.option("--sample-temperature", type=float, help="--sample: the draws' temperature, the one students train at (default 4).")
@click.option("--sample-seed", type=int, help="--sample: seed of the draws (default 0).")
@click.option("--views", type=int, help="Augmented views per training sample, each with its own teacher output (default 1).")
@click.option("--augment", help="Transform of the views: cifar, imagenet, digits, none (default) or module:callable.")
@click.option("--augment-seed", type=int, help="Base of every view's seed (default 0).")
@click.option("--augment-split", "augment_splits", multiple=True, help="Split that gets views (default: train); repeatable.")
@click.option("--mix", type=click.Choice(["mixup", "cutmix"]), help="Mix each view with a recorded partner sample.")
@click.option("--mix-alpha", type=float, help="Beta(alpha, alpha) mixing weights (default 1).")
@click.option("--batch-size", type=int, help="Teacher inputs per batch, B // V samples of V views (default 256).")
@click.option("--num-workers", type=int, help="DataLoader worker processes (default 0).")
@click.option("--device", help="auto (default), cpu, cuda, cuda:N.")
@click.option("--allow-nonfinite", is_flag=True, default=None, help="Keep NaN/Inf teacher outputs instead of stopping.")
@click.option("--random-teacher", is_flag=True, default=None,
              help="Allow a --teacher NAME without --weights: a randomly initialised network (benchmarks).")
@click.option("--amp/--no-amp", default=None,
              help="CUDA autocast for the teacher (default: only when --dtype is not float32, so float32 stores are float32-accurate).")
@click.option("--resume", is_flag=True, default=None, help="Finish an interrupted dump of the same teacher and data.")
@click.option("--overwrite", is_flag=True, default=None, help="Replace an existing store once the new one is complete.")
@config_option
def dump_teacher_cmd(config_file, **options):
    """Run a teacher once over a dataset and write its logits (and activations) to a store."""
    from kdcache.config import DumpConfig
    from kdcache.dump import dump_teacher

    from kdcache.distributed import Dist

    out = dump_teacher(_config(DumpConfig, config_file, options))
    if Dist.from_env().is_main:  # under torchrun: said once, not once per rank
        click.echo(f"wrote {out}")


@cli.command("train-student")
@click.option("--cache", help="Teacher store from dump-teacher; without it, plain training (or online KD with --teacher).")
@click.option("--student", "students", multiple=True, help="Student model name; repeat for a sweep.")
@click.option("--dataset", help="The dataset the cache was made from (checked by fingerprint).")
@click.option("--data-root", type=click.Path())
@click.option("--epochs", type=int)
@click.option("--batch-size", type=int)
@click.option("--optimizer", type=click.Choice(["sgd", "adamw"]))
@click.option("--lr", type=float)
@click.option("--weight-decay", type=float)
@click.option("--lr-schedule", type=click.Choice(["cos", "step"]))
@click.option("--alpha", type=float, help="KD weight at the end of its schedule (default 0.9).")
@click.option("--alpha-start", type=float, help="KD weight at the start of its schedule (default 0).")
@click.option("--alpha-schedule", type=click.Choice(["constant", "linear", "cos", "step", "one_cycle", "agp"]))
@click.option("--temperature", type=float, help="Softmax temperature of the KD term (default 4).")
@click.option("--loss", help="Logit KD loss: soft_target (default), logits, mutual, dkd, nkd.")
@click.option("--feature", "features", multiple=True,
              help="Feature KD pair S_LAYER=T_ACT[:LOSS]; repeatable. T_ACT: a cached activation (with --cache) or a "
                   "teacher module (with --teacher). LOSS: fitnet (default), attention, activation_boundaries, "
                   "similarity, pkt, rkd.")
@click.option("--feature-weight", type=float, help="Weight of the summed feature losses at the end of its schedule (default 1).")
@click.option("--feature-weight-start", type=float, help="Feature weight at the start of its schedule (default 0).")
@click.option("--feature-weight-schedule", type=click.Choice(["constant", "linear", "cos", "step", "one_cycle", "agp"]))
@click.option("--baseline", is_flag=True, default=None, help="Also train each student without KD.")
@click.option("--teacher", help="Checkpoint for online KD (no cache), for comparison; or a model name with --weights.")
@click.option("--weights", type=click.Path(), help="State dict or model.pt for a --teacher given by name (module:callable).")
@click.option("--random-teacher", is_flag=True, default=None,
              help="Allow online KD from a --teacher NAME without --weights: a random network (benchmarks).")
@click.option("--out", help="Output folder (default runs/train).")
@click.option("--seed", type=int)
@click.option("--augment", help="The student's own augmentation (no cache, or a clean one): cifar, imagenet, digits, "
                                "none, module:callable. A view cache brings its own.")
@click.option("--views", type=int, help="Views per sample to draw from with --augment (default 0: a fresh one each epoch).")
@click.option("--augment-seed", type=int, help="Base of the view seeds with --augment, as dump-teacher's (default 0).")
@click.option("--view-policy", type=click.Choice(["random", "cycle"]), help="Which view a sample trains on each epoch (default random).")
@click.option("--mix", type=click.Choice(["mixup", "cutmix"]), help="Mix the student's views (from a cache: only if dumped with --mix).")
@click.option("--mix-alpha", type=float, help="Beta(alpha, alpha) mixing weights (default 1).")
@click.option("--verify-replay", type=int, help="Views of a view cache to regenerate and check before training (default 64; 0: none).")
@click.option("--topk-reconstruction", type=click.Choice(["sparse", "dense"]),
              help="Top-k caches: KL over the K classes plus a tail bucket (default), or FKD's dense even tail.")
@click.option("--targets-in", type=click.Choice(["auto", "memory", "gpu", "stream"]),
              help="Where the teacher targets live: RAM, GPU, or streamed in blocks (default auto: by size and device).")
@click.option("--buffer-blocks", type=int, help="--targets-in stream: blocks shuffled together (default 8).")
@click.option("--jobs", type=int, help="Students trained at once, one per GPU or sharing the CPU (default 1).")
@click.option("--device")
@click.option("--num-workers", type=int)
@click.option("--train-split", help="Split to train on (default train).")
@click.option("--test-split", help="Split to evaluate on (default test).")
@click.option("--resume", is_flag=True, default=None, help="Continue killed runs from their last epoch; skip finished students.")
@click.option("--verify", is_flag=True, default=None, help="Check every chunk of the cache against its checksum first.")
@click.option("--overwrite", is_flag=True, default=None, help="Replace students already trained in --out.")
@config_option
def train_student_cmd(config_file, **options):
    """Train students from a teacher cache, with a scheduled KD weight alpha (and feature KD)."""
    from kdcache.config import TrainConfig
    from kdcache.sweep import train_student

    train_student(_config(TrainConfig, config_file, options))


@cli.command("inspect")
@click.argument("store")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def inspect_cmd(store, as_json):
    """Show what a store holds: splits, arrays, bytes per sample, teacher, dataset."""
    from kdcache.report import describe_store, format_report

    report = describe_store(store)
    click.echo(json.dumps(report, indent=2) if as_json else format_report(report))


@cli.command("verify")
@click.argument("store")
@click.option("--dataset", help="Dataset to check the fingerprint against (default: the store's; a module:callable "
                                "the store names runs only when given here).")
@click.option("--augment", help="The views' module:callable transform, to replay them (a store's own code never runs).")
@click.option("--data-root", type=click.Path(), help="Folder holding the dataset (default: the store's).")
def verify_cmd(store, dataset, augment, data_root):
    """Check a store: complete, every row written, finite values. Exit 1 on any problem."""
    from kdcache.verify import verify_store

    problems = verify_store(store, dataset=dataset, augment=augment, data_root=data_root)
    for line in problems:
        click.echo(f"problem: {line}")
    click.echo(f"{store}: {'OK' if not problems else f'{len(problems)} problem(s)'}")
    if problems:
        sys.exit(1)


@cli.command("convert")
@click.argument("src")
@click.argument("dst")
@click.option("--dtype", type=click.Choice(["float16", "bfloat16", "float32", "int8", "uint8"]),
              help="Storage dtype of DST's logits (and activations) (default: SRC's; int8: dense logits quantized per row; "
                   "uint8: top-k values as 8-bit codes).")
@click.option("--topk", type=int, help="Keep the K largest logits per view, K <= SRC's for a top-k SRC (default: "
                                       "SRC's; 0: dense logits).")
@click.option("--topk-indices", type=click.Choice(["plain", "packed"]),
              help="Class indices of top-k/sampled targets: plain integers or packed, ceil(log2 C) bits each (default: SRC's).")
@click.option("--sample", type=int, help="Store S classes drawn per view from the tempered teacher (random-sampling KD).")
@click.option("--sample-temperature", type=float, help="--sample: the draws' temperature, the one students train at (default 4).")
@click.option("--sample-seed", type=int, help="--sample: seed of the draws (default 0).")
@click.option("--budget", help="Pick the encoding: the most faithful (kdcache fidelity) within 64B per sample, or a "
                               "total such as 40GB of targets over every split.")
@click.option("--temperature", type=float, default=4.0, show_default=True,
              help="--budget: the training temperature fidelity is measured at.")
@click.option("--overwrite", is_flag=True, help="Replace an existing DST once the new one is complete.")
@click.option("--resume", is_flag=True, help="Finish an interrupted convert (DST.partial) of the same SRC.")
def convert_cmd(src, dst, dtype, topk, topk_indices, sample, sample_temperature, sample_seed, budget, temperature,
                overwrite, resume):
    """Re-encode a store without the teacher: another --dtype or --topk, zarr <-> HDF5 by DST's suffix."""
    from kdcache.convert import convert_store

    out = convert_store(src, dst, dtype=dtype, topk=topk, indices=topk_indices, sample=sample,
                        sample_temperature=sample_temperature, sample_seed=sample_seed, budget=budget,
                        temperature=temperature, overwrite=overwrite, resume=resume)
    click.echo(f"wrote {out}")


@cli.command("fidelity")
@click.argument("store")
@click.option("--split", help="Split to sample (default train, else the store's first).")
@click.option("--candidates", multiple=True, help="Encodings to measure, e.g. float16,int8,top32-float16,"
                                                  "top32-uint8-packed,sample12-float16-packed (default: a grid of them).")
@click.option("--temperature", type=float, default=4.0, show_default=True, help="Training temperature of the targets compared.")
@click.option("--rows", type=int, help="Samples to measure (default: up to 2,048, whole blocks spread over the split).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def fidelity_cmd(store, split, candidates, temperature, rows, as_json):
    """Bytes on disk and fidelity to the full targets of candidate encodings, measured on a sample of STORE."""
    from kdcache.fidelity import as_json as plain, format_report, measure

    names = [n for c in candidates for n in c.split(",") if n.strip()]
    report = measure(store, split=split, candidates=names or None, temperature=temperature, rows=rows)
    click.echo(json.dumps(plain(report), indent=2) if as_json else format_report(report))


@cli.command("layers")
@click.argument("model")
@click.option("--num-classes", type=int, default=10, show_default=True, help="Classes of a model given by name.")
@click.option("--input-size", type=int, default=32, show_default=True, help="Height and width of the probe input.")
def layers_cmd(model, num_classes, input_size):
    """List a model's (a name's, or a checkpoint's) dotted module names with output shapes (for --activation, --feature)."""
    from kdcache.models import layers_model, list_layers

    net, in_chans = layers_model(model, num_classes=num_classes)
    for layer in list_layers(net, (1, in_chans, input_size, input_size)):
        shape = "x".join(map(str, layer["shape"][1:])) if layer["shape"] else "-"
        click.echo(f"{layer['name'] or '(model)':<32} {layer['type']:<20} {shape:<14} {layer['params']:>10,}")


@cli.command("models")
def models_cmd():
    """List the model names --teacher and --student accept (module:callable works too)."""
    from kdcache.models import model_names

    for name in model_names():
        click.echo(name)


@cli.command("run")
@click.argument("pipeline", type=click.Path())
def run_cmd(pipeline):
    """Run the stages of a pipeline file (see pipelines/) in order."""
    from kdcache.pipeline import run_pipeline

    run_pipeline(pipeline)


def main(argv=None):
    """Entry point: user errors become one line on stderr and exit status 2, never a traceback."""
    from kdcache.signals import Terminated, sigterm_raises

    try:
        with sigterm_raises():  # SIGTERM unwinds as Ctrl-C does: a resumable state, no lock left held
            cli.main(args=argv, prog_name="kdcache", standalone_mode=False)
    except KDCacheError as e:
        message = str(e)
        if "\nOriginal Traceback" in message:  # raised in a DataLoader worker: torch put the worker's traceback first
            message = message.rstrip().splitlines()[-1].split(": ", 1)[-1]
        click.echo(f"kdcache: error: {message}", err=True)
        sys.exit(2)
    except (click.exceptions.Abort, KeyboardInterrupt) as e:  # click turns Ctrl-C (and so SIGTERM) into Abort
        stop = e if isinstance(e, KeyboardInterrupt) else e.__cause__
        resume = "; what was written is kept: dump-teacher, convert and train-student finish it with --resume"
        if isinstance(stop, Terminated):
            click.echo(f"kdcache: terminated{resume}", err=True)
            sys.exit(143)
        click.echo(f"kdcache: interrupted{resume}" if isinstance(stop, KeyboardInterrupt) else "kdcache: aborted", err=True)
        sys.exit(130)
    except OSError as e:  # the environment, not a bug: a full disk, a read-only or forbidden path
        if e.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS):
            raise
        where = f" ({e.filename})" if e.filename else ""
        fix = ("free space, then rerun the same command with --resume: the whole blocks and epochs written are kept"
               if e.errno in (errno.ENOSPC, errno.EDQUOT) else "choose a path you can write, or fix its permissions")
        click.echo(f"kdcache: error: {e.strerror or e}{where}; {fix}", err=True)
        sys.exit(2)
    except click.ClickException as e:  # bad flags: click's message, on one line
        command = f" {e.ctx.command_path.split(' ', 1)[1]}" if getattr(e, "ctx", None) and " " in e.ctx.command_path else ""
        click.echo(f"kdcache{command}: error: {e.format_message()} (see --help)", err=True)
        sys.exit(2)
