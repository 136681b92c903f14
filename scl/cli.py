"""Command-line flags derived from a config dataclass: `--field=value`, names exactly as the fields.
The dataclass is the single source of defaults; unknown flags and bad values exit 2 with one line.
"""
import dataclasses
import json
import sys
import types
import typing


class CLIError(SystemExit):
    """A bad command line: the message is printed and the process exits with status 2."""

    def __init__(self, message: str):
        print(f"error: {message}", file=sys.stderr)
        super().__init__(2)


def _convert(name: str, text: str, kind):
    if isinstance(kind, types.UnionType):  # X | None
        return None if text.lower() in ("none", "null", "") else _convert(name, text, typing.get_args(kind)[0])
    if kind is bool:
        if text.lower() not in ("1", "true", "yes", "on", "0", "false", "no", "off"):
            raise CLIError(f"--{name} expects true or false, got {text!r}")
        return text.lower() in ("1", "true", "yes", "on")
    if kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            raise CLIError(f"--{name} expects {kind.__name__}, got {text!r}") from None
    if typing.get_origin(kind) is list:  # list[X]: comma-separated
        return [_convert(name, t.strip(), typing.get_args(kind)[0]) for t in text.split(",") if t.strip()]
    return text


def parse_cli(cls, argv: list[str] | None = None):
    """Build `cls` from `--field=value` flags (sys.argv's when argv is None)."""
    hints = typing.get_type_hints(cls)
    fields, values = {f.name for f in dataclasses.fields(cls)}, {}
    for arg in sys.argv[1:] if argv is None else argv:
        if arg in ("-h", "--help"):
            print(describe(cls))
            raise SystemExit(0)
        key, eq, text = arg[2:].partition("=")
        key = key.replace("-", "_")
        if not arg.startswith("--") or not (eq or (key in fields and hints[key] is bool)):
            raise CLIError(f"flags are --field=value, got {arg!r} (see --help)")
        if key not in fields:
            raise CLIError(f"unknown flag --{key} (known: {', '.join(sorted(fields))})")
        values[key] = _convert(key, text if eq else "true", hints[key])  # `--resume` alone means `--resume=true`
    try:
        return cls(**values)
    except (TypeError, ValueError) as e:
        raise CLIError(str(e)) from None


def describe(cls) -> str:
    """Help text: every field with its default."""
    lines = [f"{cls.__doc__ or cls.__name__}".strip(), "", "flags (--field=value):"]
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else "(required)")
        lines.append(f"  --{f.name}={default}")
    return "\n".join(lines)


def to_json(config) -> str:
    """The resolved config, as scripts print it and save it beside their outputs."""
    return json.dumps(dataclasses.asdict(config), indent=2, sort_keys=True)
