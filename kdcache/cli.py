"""The `kdcache` command line: parses options, builds the config, calls the stage. No logic here.

Every user error ends as one line on stderr and exit status 2.
"""
from __future__ import annotations

import dataclasses
import errno
import json
import re
import sys
import typing

import click

from kdcache import choices
from kdcache.config import GROUPS, DumpConfig, TrainConfig, flag_of, read_yaml, resolve
from kdcache.errors import KDCacheError


def _given(options: dict) -> dict:
    """Flags the user actually passed (click gives None or () for the rest)."""
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in options.items() if v is not None and v != ()}


def _config(cls, config_file, options):
    file_values = read_yaml(config_file) if config_file else {}
    given = _given(options)
    cfg = resolve(cls, file_values=file_values, overrides=given, source=config_file or "options")
    from kdcache.pipeline import default_dataset_note

    note = default_dataset_note(cfg, named="dataset" in given or "dataset" in file_values,
                                fix="pass --dataset NAME for yours")
    if note:
        click.echo(note)
    return cfg


class GroupedOption(click.Option):
    """An option that knows its --help section (GroupedCommand)."""

    def __init__(self, *args, group: str = "other", **kwargs):
        super().__init__(*args, **kwargs)
        self.group = group


config_option = click.option("--config", "config_file", type=click.Path(), cls=GroupedOption, group="run",
                             help="YAML file of options (the same names, with _ or -); flags override it.")


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="kdcache")
def cli():
    """Offline knowledge distillation: dump a teacher's outputs once, train many students from them."""


class GroupedCommand(click.Command):
    """A command whose --help lists its options by section (data, teacher, store, training, KD, views,
    run), each with its help and default: the sections come from the config fields' declarations."""

    def format_options(self, ctx, formatter):
        groups: dict = {}
        for param in self.get_params(ctx):
            record = param.get_help_record(ctx)
            if record is not None:
                groups.setdefault(getattr(param, "group", "run"), []).append(record)  # --help: with the run
        for group in (*GROUPS, "other"):
            if group in groups:
                with formatter.section(f"{group.capitalize() if group != 'KD' else 'KD'} options"):
                    formatter.write_dl(groups[group])


def _shown(default) -> str:
    """A default as --help shows it."""
    if isinstance(default, list):
        return ", ".join(default) if default else "none"
    if default is None or default == "":
        return "none"
    if isinstance(default, bool):
        return "on" if default else "off"
    return str(default)


def config_options(cls):
    """The click options of config dataclass `cls`, one per field, generated from its declaration
    (kdcache/config.py `option`): flag, type, choices, help, default and --help section. Click's own
    default stays None, so a flag the user did not pass leaves the config file's value in force."""
    hints = typing.get_type_hints(cls)

    def decorate(fn):
        for f in reversed(dataclasses.fields(cls)):
            kind = hints[f.name]
            args = [a for a in typing.get_args(kind) if a is not type(None)]
            base = args[0] if args else kind
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            flag, meta = flag_of(f), f.metadata
            extra: dict = {}
            if base is bool and type(None) in typing.get_args(kind):  # unset, on or off: --amp/--no-amp
                decls, extra["default"] = [f"{flag}/--no-{flag[2:]}", f.name], None
            elif base is bool:
                decls, extra = [flag, f.name], {"is_flag": True, "default": None}
            else:
                decls = [flag, f.name]
                extra["type"] = click.Choice(meta["choices"]) if meta.get("choices") else {int: int, float: float}.get(base, str)
                extra["multiple"] = base is list
            fn = click.option(*decls, cls=GroupedOption, group=meta["group"],
                              help=f"{meta['help']}.  [default: {_shown(default)}]", **extra)(fn)
        return fn

    return decorate


@cli.command("dump-teacher", cls=GroupedCommand)
@config_options(DumpConfig)
@config_option
def dump_teacher_cmd(config_file, **options):
    """Run a teacher once over a dataset and write its logits (and activations) to a store."""
    from kdcache.distributed import Dist  # deferred, as every stage: --help imports no torch
    from kdcache.dump import dump_teacher

    out = dump_teacher(_config(DumpConfig, config_file, options))
    if Dist.from_env().is_main:  # under torchrun: said once, not once per rank
        click.echo(f"wrote {out}")


@cli.command("train-student", cls=GroupedCommand)
@config_options(TrainConfig)
@config_option
def train_student_cmd(config_file, **options):
    """Train students from a teacher cache, with a scheduled KD weight alpha (and feature KD)."""
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
@click.option("--tokenizer", help="A token store's tokenizer, to tokenize its text again (default: the one it records).")
def verify_cmd(store, dataset, augment, data_root, tokenizer):
    """Check a store: complete, every row written, finite values. Exit 1 on any problem."""
    from kdcache.verify import verify_store

    problems = verify_store(store, dataset=dataset, augment=augment, data_root=data_root, tokenizer=tokenizer)
    for line in problems:
        click.echo(f"problem: {line}")
    click.echo(f"{store}: {'OK' if not problems else f'{len(problems)} problem(s)'}")
    if problems:
        sys.exit(1)


@cli.command("convert")
@click.argument("src")
@click.argument("dst")
@click.option("--dtype", type=click.Choice(choices.DTYPES),
              help="Storage dtype of DST's logits (and activations) (default: SRC's; int8: dense logits quantized per row; "
                   "uint8: top-k values as 8-bit codes).")
@click.option("--topk", type=int, help="Keep the K largest logits per view, K <= SRC's for a top-k SRC (default: "
                                       "SRC's; 0: dense logits).")
@click.option("--topk-indices", type=click.Choice(choices.INDEX_LAYOUTS),
              help="Class indices of top-k/sampled targets: plain integers or packed, ceil(log2 C) bits each (default: SRC's).")
@click.option("--sample", type=int, help="Store S classes drawn per view from the tempered teacher (random-sampling KD).")
@click.option("--sample-temperature", type=float, help="--sample: the draws' temperature, the one students train at (default 4).")
@click.option("--sample-seed", type=int, help="--sample: seed of the draws (default 0).")
@click.option("--budget", help="Pick the encoding: the best (see --rank) within 64B per sample, or a "
                               "total such as 40GB of targets over every split.")
@click.option("--temperature", type=float, default=4.0, show_default=True,
              help="--budget: the training temperature fidelity is measured (and probes trained) at.")
@click.option("--rank", type=click.Choice(choices.BUDGET_RANKS), default="fidelity", show_default=True,
              help="--budget: the candidate closest to the full targets (kdcache fidelity), or the one a probe student "
                   "trained from each learns best from (one short run per candidate that fits).")
@click.option("--probe-student", default="cnn_tiny", show_default=True, help="--rank student: the probe student.")
@click.option("--probe-epochs", type=int, help="--rank student: epochs of each probe run (default: the fewest that "
                                              "make 300 steps of train-student's batches; 1 on 20k samples).")
@click.option("--dataset", help="--rank student: the dataset the probes train on (default: the store's, when it names "
                                "one kdcache knows).")
@click.option("--data-root", help="--rank student: folder holding a torchvision dataset.")
@click.option("--overwrite", is_flag=True, help="Replace an existing DST once the new one is complete.")
@click.option("--resume", is_flag=True, help="Finish an interrupted convert (DST.partial) of the same SRC.")
def convert_cmd(src, dst, dtype, topk, topk_indices, sample, sample_temperature, sample_seed, budget, temperature,
                rank, probe_student, probe_epochs, dataset, data_root, overwrite, resume):
    """Re-encode a store without the teacher: another --dtype or --topk, zarr <-> HDF5 by DST's suffix."""
    from kdcache.convert import convert_store

    ranker = None
    if rank == "student":
        from kdcache.probe import student_ranker

        if budget is None:
            raise KDCacheError("--rank student ranks the candidates of --budget; add --budget, or drop --rank")
        ranker = student_ranker(src, student=probe_student, epochs=probe_epochs, dataset=dataset, data_root=data_root)
    elif dataset or data_root:
        raise KDCacheError("--dataset and --data-root feed the probes of --rank student; drop them, or add --rank student")
    out = convert_store(src, dst, dtype=dtype, topk=topk, indices=topk_indices, sample=sample,
                        sample_temperature=sample_temperature, sample_seed=sample_seed, budget=budget,
                        temperature=temperature, ranker=ranker, overwrite=overwrite, resume=resume)
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
@click.option("--resume", is_flag=True, help="Re-run after a stop: complete stores are skipped, interrupted dumps "
                                              "and trainings resumed, trained students kept.")
def run_cmd(pipeline, resume):
    """Run the stages of a pipeline file (see pipelines/) in order, after checking every stage."""
    from kdcache.pipeline import run_pipeline

    run_pipeline(pipeline, resume=resume)


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
        message = re.sub(r"\s*\n\s*", " ", message.strip())  # a library's text inside it (h5py's has newlines)
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
        in_the_way = (errno.ENOTDIR, errno.EEXIST, errno.EISDIR)  # a file where a folder goes, or the other way round
        if e.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS, *in_the_way):
            _environment_or_raise(e)
        where = f" ({e.filename})" if e.filename else ""
        fix = ("free space, then rerun the same command with --resume: the whole blocks and epochs written are kept"
               if e.errno in (errno.ENOSPC, errno.EDQUOT) else
               "a file and a folder cannot share a path: choose another path, or move what is there"
               if e.errno in in_the_way else "choose a path you can write, or fix its permissions")
        click.echo(f"kdcache: error: {e.strerror or e}{where}; {fix}", err=True)
        sys.exit(2)
    except click.ClickException as e:  # bad flags: click's message, on one line
        command = f" {e.ctx.command_path.split(' ', 1)[1]}" if getattr(e, "ctx", None) and " " in e.ctx.command_path else ""
        click.echo(f"kdcache{command}: error: {e.format_message()} (see --help)", err=True)
        sys.exit(2)
    except Exception as e:  # an object store that cannot be reached, a bucket that is not there
        _environment_or_raise(e)


def _environment_or_raise(e: BaseException) -> None:
    """One line and exit 2 for an environment the user can fix (kdcache.store.remote); a bug re-raises."""
    from kdcache.store.remote import environment_error

    why = environment_error(e)
    if why is None:
        raise e
    click.echo(f"kdcache: error: {why}", err=True)
    sys.exit(2)
