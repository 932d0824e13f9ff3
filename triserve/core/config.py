"""``config.pbtxt`` -> ``ModelConfig``: parsing, checks, and Triton's JSON view.

Parsing is protobuf's own ``text_format`` into tritonclient's ``ModelConfig``,
so every field Triton knows is accepted with Triton's meaning. Two things
Triton users write that ``text_format`` does not read are handled here: ``//``
comments (the seed's config is full of them) and ``$$TRITON_MODEL_DIRECTORY``
in parameter values.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from google.protobuf import descriptor, json_format, text_format
from tritonclient.grpc import model_config_pb2

from triserve.core import datatypes

ModelConfig = model_config_pb2.ModelConfig

CONFIG_FILENAME = "config.pbtxt"
MODEL_DIRECTORY_VARIABLE = "$$TRITON_MODEL_DIRECTORY"

_INT64_TYPES = frozenset({
    descriptor.FieldDescriptor.TYPE_INT64,
    descriptor.FieldDescriptor.TYPE_UINT64,
    descriptor.FieldDescriptor.TYPE_SINT64,
    descriptor.FieldDescriptor.TYPE_FIXED64,
    descriptor.FieldDescriptor.TYPE_SFIXED64,
})
_PARSE_ERROR_LOCATION = re.compile(r"^\d+(:\d+)? : ")


class ConfigError(ValueError):
    """A model configuration that cannot be used; the message is for the user."""


def strip_slash_comments(text: str) -> str:
    """Remove ``// ...`` comments that are outside string literals.

    Lines are kept (only the comment text goes), so parse errors still point
    at the right line and column; ``"http://x"`` and ``# ...`` comments stay.
    """
    lines = []
    for line in text.split("\n"):
        quote = ""
        i = 0
        cut = len(line)
        while i < len(line):
            char = line[i]
            if quote:
                if char == "\\":
                    i += 1
                elif char == quote:
                    quote = ""
            elif char in "\"'":
                quote = char
            elif char == "#":
                break
            elif line.startswith("//", i):
                cut = i
                break
            i += 1
        lines.append(line[:cut])
    return "\n".join(lines)


def parse_config(text: str, source: str = CONFIG_FILENAME) -> ModelConfig:
    """Parse config text; a syntax error reads ``<source>:<line>:<col>: <message>``."""
    config = ModelConfig()
    try:
        text_format.Parse(strip_slash_comments(text), config)
    except text_format.ParseError as exc:
        message = _PARSE_ERROR_LOCATION.sub("", str(exc), count=1)
        raise ConfigError(f"{source}:{exc.GetLine()}:{exc.GetColumn()}: {message}") from None
    return config


def parse_config_json(text: str, source: str = "config override") -> ModelConfig:
    """Parse a config given as JSON (the repository extension's load ``config`` parameter)."""
    config = ModelConfig()
    try:
        json_format.Parse(text, config)
    except json_format.ParseError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    return config


def read_config(model_dir: Path) -> ModelConfig:
    """Read ``<model_dir>/config.pbtxt``, fill in the name, expand variables, and check it."""
    path = model_dir / CONFIG_FILENAME
    shown = f"{model_dir.name}/{CONFIG_FILENAME}"  # errors reach clients: no server paths in them
    if not path.is_file():
        raise ConfigError(
            f"{shown} not found: every model folder needs a {CONFIG_FILENAME} "
            "(at least its backend, inputs and outputs)"
        )
    config = parse_config(path.read_text(encoding="utf-8"), shown)
    return finish_config(config, model_dir, shown)


def finish_config(config: ModelConfig, model_dir: Path, source: str) -> ModelConfig:
    """What Triton does to every config after parsing: name, variables, validation."""
    if not config.name:
        config.name = model_dir.name
    elif config.name != model_dir.name:
        raise ConfigError(
            f"{source}: model name '{config.name}' must match its folder name '{model_dir.name}'"
        )
    expand_model_directory(config, model_dir)
    validate_config(config, source)
    return config


def expand_model_directory(config: ModelConfig, model_dir: Path) -> None:
    """Replace ``$$TRITON_MODEL_DIRECTORY`` in parameters' string values with the model's folder."""
    for parameter in config.parameters.values():
        if MODEL_DIRECTORY_VARIABLE in parameter.string_value:
            parameter.string_value = parameter.string_value.replace(
                MODEL_DIRECTORY_VARIABLE, str(model_dir.resolve())
            )


def validate_config(config: ModelConfig, source: str = CONFIG_FILENAME) -> None:
    """Check what the core relies on; the first problem found is raised as :class:`ConfigError`."""
    if config.max_batch_size < 0:
        raise ConfigError(f"{source}: max_batch_size must be >= 0, got {config.max_batch_size}")
    _validate_tensors("input", config.input, source)
    _validate_tensors("output", config.output, source)
    if config.HasField("dynamic_batching"):
        _validate_priorities(config.dynamic_batching, source)
    if config.HasField("dynamic_batching") and config.max_batch_size > 0:
        for size in config.dynamic_batching.preferred_batch_size:
            if not 0 < size <= config.max_batch_size:
                raise ConfigError(
                    f"{source}: dynamic_batching preferred_batch_size {size} must be between 1 "
                    f"and max_batch_size {config.max_batch_size}"
                )


def _validate_priorities(batching, source: str) -> None:
    levels = batching.priority_levels
    if levels == 0:
        if batching.default_priority_level or batching.priority_queue_policy:
            raise ConfigError(f"{source}: dynamic_batching default_priority_level and priority_queue_policy "
                              "need priority_levels > 0")
        return
    if not 1 <= batching.default_priority_level <= levels:
        raise ConfigError(f"{source}: dynamic_batching default_priority_level must be between 1 and "
                          f"priority_levels {levels}, got {batching.default_priority_level}")
    for level in batching.priority_queue_policy:
        if not 1 <= level <= levels:
            raise ConfigError(f"{source}: dynamic_batching priority_queue_policy level {level} must be "
                              f"between 1 and priority_levels {levels}")


def _validate_tensors(kind: str, tensors, source: str) -> None:
    seen: set[str] = set()
    for index, tensor in enumerate(tensors):
        where = f"{source}: {kind} {index}" + (f" '{tensor.name}'" if tensor.name else "")
        if not tensor.name:
            raise ConfigError(f"{where}: 'name' is required")
        if tensor.name in seen:
            raise ConfigError(f"{where}: {kind} '{tensor.name}' is defined more than once")
        seen.add(tensor.name)
        type_name = model_config_pb2.DataType.Name(tensor.data_type)
        if type_name not in datatypes.CONFIG_TO_KSERVE:
            raise ConfigError(
                f"{where}: 'data_type' is required, one of "
                + ", ".join(datatypes.CONFIG_TO_KSERVE)
                + ("" if tensor.data_type == model_config_pb2.TYPE_INVALID else f" (got {type_name})")
            )
        if not tensor.dims:
            raise ConfigError(f"{where}: 'dims' is required, e.g. dims: [ -1 ]")
        if any(d == 0 or d < -1 for d in tensor.dims):
            raise ConfigError(
                f"{where}: dims {list(tensor.dims)} may hold only positive sizes or -1 (any size)"
            )


def config_to_json(config: ModelConfig) -> dict[str, Any]:
    """The config as Triton's ``/config`` endpoint and ``args['model_config']`` show it.

    Like Triton: proto field names, every field printed (defaults too), and
    64-bit integers as JSON numbers rather than protobuf's quoted strings.
    """
    data = json_format.MessageToDict(
        config, always_print_fields_with_no_presence=True, preserving_proto_field_name=True
    )
    _int64_strings_to_numbers(config.DESCRIPTOR, data)
    return data


def _int64_strings_to_numbers(message_type: descriptor.Descriptor, data: dict[str, Any]) -> None:
    for field in message_type.fields:
        if field.name not in data:
            continue
        value = data[field.name]
        if field.type in _INT64_TYPES:
            data[field.name] = [int(v) for v in value] if isinstance(value, list) else int(value)
        elif field.message_type is not None:
            if field.message_type.GetOptions().map_entry:
                value_field = field.message_type.fields_by_name["value"]
                items = list(value.items())
                if value_field.type in _INT64_TYPES:
                    data[field.name] = {k: int(v) for k, v in items}
                elif value_field.message_type is not None:
                    for _, item in items:
                        _int64_strings_to_numbers(value_field.message_type, item)
            elif isinstance(value, list):
                for item in value:
                    _int64_strings_to_numbers(field.message_type, item)
            elif isinstance(value, dict):
                _int64_strings_to_numbers(field.message_type, value)
