"""What the report scripts (train/report_*.py) share: their entry point and options, where they read shipped vectors
and write results, and resuming. A report runs for hours and keeps each result as it completes; a result records
the settings it was made with, so that a rerun with other settings is refused in one line before any model work
instead of mixing two settings under one label (--force starts that result over)."""

import argparse
import json
import sys
from pathlib import Path

from fvpatch.errors import FvpatchError
from fvpatch.shipped import VECTORS_DIR

# train/ is installed beside fvpatch/ by the wheel: only a checkout has a results/ folder of its own to write in.
_CHECKOUT = Path(__file__).resolve().parent.parent
IN_CHECKOUT = (_CHECKOUT / "pyproject.toml").is_file()


def positive_int(text: str) -> int:
    """An argparse type for counts: a negative one would slice `[:-3]` and a zero one score nothing."""
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"{n} is not a positive count")
    return n


def add_options(ap: argparse.ArgumentParser, force: str | None) -> None:
    """--results, and --force (its help `force`) for a report whose results depend on settings."""
    ap.add_argument("--results", type=Path, default=None,
                    help="Folder the results go in (default: results/ of the checkout; required outside one).")
    if force:
        ap.add_argument("--force", action="store_true", help=force[0].upper() + force[1:] + ".")


def results_dir(args: argparse.Namespace) -> Path:
    """The folder results go in: --results, else the checkout's results/. An installed package has none: writing
    beside it would put results into site-packages."""
    if args.results is not None:
        return args.results
    return checkout_results("--results DIR")


def checkout_results(option: str) -> Path:
    """The checkout's results/ folder; outside a checkout, a refusal asking for `option`."""
    if not IN_CHECKOUT:
        raise FvpatchError(f"outside a checkout there is no results/ folder to write in; give one with {option}")
    return _CHECKOUT / "results"


def vectors_dir(name: str, writes: bool = False) -> Path:
    """The shipped vectors of model `name` (the installed package's, outside a checkout). A report that writes
    vectors there runs only in a checkout: they are the project's files, not a place for one run's output."""
    if writes and not IN_CHECKOUT:
        raise FvpatchError(f"this report writes shipped vectors ({VECTORS_DIR / name}); run it in a checkout of fvpatch")
    return VECTORS_DIR / name


def _flags(settings: dict, keys) -> str:
    """Settings as the options that give them (`--n-test 50`, `--ffv-only`, `no --ffv-only`)."""
    def flag(key):
        value, option = settings.get(key), "--" + key.replace("_", "-")
        if isinstance(value, bool):
            return option if value else f"no {option}"
        return f"{option} {value}"
    return ", ".join(flag(k) for k in keys)


def refuse_other(where: str | Path, recorded: dict | None, settings: dict) -> None:
    """Refuse, in one line, results at `where` made with other settings than `settings` (None: not recorded)."""
    if recorded == settings:
        return
    if recorded is None:
        raise FvpatchError(f"{where} does not record the settings it was made with; pass --force to start over")
    differ = [k for k in {**recorded, **settings} if recorded.get(k) != settings.get(k)]
    raise FvpatchError(f"{where} was made with {_flags(recorded, differ)}; rerun with those settings, or pass --force to start over")


def read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise FvpatchError(f"{path} is not a readable results file ({e}); remove it or pass --force") from None


def resume(path: Path, settings: dict, force: bool, legacy=None) -> dict | None:
    """The results at `path` to go on from, or None where there are none or `force` starts over; results made with
    other settings are refused. `legacy(results)` gives the settings of a file written before they were recorded,
    from what it did record."""
    if force or not path.exists():
        return None
    data = read_json(path)
    recorded = data.get("settings") if isinstance(data, dict) else None
    refuse_other(path, recorded if recorded is not None or legacy is None else legacy(data), settings)
    return data


def run(main) -> None:
    """Run a report's main() and exit with what it returns: bad input ends in one line (`Error: ...`, exit 1), as the fvpatch CLI does, and so
    does Ctrl-C: what was written stays, and a rerun with the same settings goes on from it."""
    try:
        code = main()
    except FvpatchError as e:
        sys.exit(f"Error: {e}")
    except KeyboardInterrupt:
        print("Interrupted; the results written so far are kept and a rerun with the same settings resumes from them.", file=sys.stderr)
        sys.exit(130)
    sys.exit(code)
