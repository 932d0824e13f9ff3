"""config.pbtxt parsing, checks and version policy (pure functions: no server needed)."""

from __future__ import annotations

from pathlib import Path

import pytest
from tritonclient.grpc import model_config_pb2

from triserve.core.config import (
    ConfigError,
    config_to_json,
    parse_config,
    parse_config_json,
    read_config,
    strip_slash_comments,
)
from triserve.core.repository import select_versions

# Section 3 of the seed article, verbatim: the ChatGLM2-6B config.pbtxt with its // comments,
# plus the EXECUTION_ENV_PATH block from section 2.
SEED_CONFIG = """\
name: "chatglm2-6b" // 必填,模型名,需与该子模型的文件夹名字相同
backend: "python" // 必填,模型所使用的后端引擎

max_batch_size: 0 // 模型每次请求最大的批数据量,张量shape由max_batch_size和dims组合指定,对于 max_batch_size 大于 0 的模型,完整形状形成为 [ -1 ] + dims。 对于 max_batch_size 等于 0 的模型,完整形状形成为 dims。
input [ // 必填,输入定义
  {
    name: "prompt" //必填,名称
    data_type: TYPE_STRING //必填,数据类型
    dims: [ -1 ] //必填,数据维度,-1 表示可变维度
  },
  {
    name: "history"
    data_type: TYPE_STRING
    dims: [ -1 ]
  },
  {
    name: "temperature"
    data_type: TYPE_STRING
    dims: [ -1 ]
  },
  {
    name: "max_token"
    data_type: TYPE_STRING
    dims: [ -1 ]
  },
  {
    name: "history_len"
    data_type: TYPE_STRING
    dims: [ -1 ]
  }
]
output [ //必填,输出定义
  {
    name: "response"
    data_type: TYPE_STRING
    dims: [ -1 ]
  },
  {
    name: "history"
    data_type: TYPE_STRING
    dims: [ -1 ]
  }
]
parameters: { //指定python执行环境
  key: "EXECUTION_ENV_PATH",
  value: {string_value: "$$TRITON_MODEL_DIRECTORY/../python-3-8.tar.gz"}
}
instance_group [ //模型实例组
  { 
      count: 1  //实例数量
      kind: KIND_GPU  //实例类型
      gpus: [ 0 ]  //指定实例可用的GPU索引
  }
]
"""


def model_folder(tmp_path: Path, name: str, config: str) -> Path:
    folder = tmp_path / name
    folder.mkdir()
    (folder / "config.pbtxt").write_text(config, encoding="utf-8")
    return folder


def test_seed_config_parses_with_its_comments(tmp_path):
    folder = model_folder(tmp_path, "chatglm2-6b", SEED_CONFIG)
    config = read_config(folder)
    assert config.name == "chatglm2-6b"
    assert config.backend == "python"
    assert config.max_batch_size == 0
    assert [i.name for i in config.input] == ["prompt", "history", "temperature", "max_token", "history_len"]
    assert all(i.data_type == model_config_pb2.TYPE_STRING for i in config.input)
    assert all(list(i.dims) == [-1] for i in config.input)
    assert [o.name for o in config.output] == ["response", "history"]
    group = config.instance_group[0]
    kind_gpu = model_config_pb2.ModelInstanceGroup.KIND_GPU
    assert (group.count, group.kind, list(group.gpus)) == (1, kind_gpu, [0])


def test_model_directory_variable_is_expanded(tmp_path):
    folder = model_folder(tmp_path, "chatglm2-6b", SEED_CONFIG)
    value = read_config(folder).parameters["EXECUTION_ENV_PATH"].string_value
    assert value == f"{folder.resolve()}/../python-3-8.tar.gz"


def test_slash_comments_inside_strings_are_kept():
    text = ('backend: "python" // the backend\n'
            'parameters { key: "URL" value { string_value: "http://x//y" } } # note // here')
    assert strip_slash_comments(text).split("\n")[0] == 'backend: "python" '
    config = parse_config(text)
    assert config.parameters["URL"].string_value == "http://x//y"
    escaped = parse_config(r'parameters { key: "Q" value { string_value: "a\"//b" } } // gone')
    assert escaped.parameters["Q"].string_value == 'a"//b'


def test_parse_error_names_file_line_and_field():
    text = 'name: "m" // fine\nbackend: "python"\n\nmax_batch_sise: 4 // typo\n'
    with pytest.raises(ConfigError) as error:
        parse_config(text, "/repo/m/config.pbtxt")
    assert str(error.value).startswith("/repo/m/config.pbtxt:4:1: ")
    assert "max_batch_sise" in str(error.value)


def test_bad_value_error_has_line_and_column():
    with pytest.raises(ConfigError) as error:
        parse_config('name: "m"\ninput [ { name: "a" data_type: TYPE_FLOAT32 dims: [ 1 ] } ]', "c.pbtxt")
    assert str(error.value).startswith("c.pbtxt:2:")
    assert "TYPE_FLOAT32" in str(error.value)


def test_name_is_filled_in_from_the_folder(tmp_path):
    folder = model_folder(tmp_path, "unnamed", 'backend: "python"')
    assert read_config(folder).name == "unnamed"


def test_name_must_match_the_folder(tmp_path):
    folder = model_folder(tmp_path, "folder_name", 'name: "other"\nbackend: "python"')
    with pytest.raises(ConfigError, match="model name 'other' must match its folder name 'folder_name'"):
        read_config(folder)


def test_missing_config_file_is_a_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="config.pbtxt not found"):
        read_config(tmp_path / "empty")


@pytest.mark.parametrize("tensor, problem", [
    ('input [ { data_type: TYPE_FP32 dims: [ 1 ] } ]', "input 0: 'name' is required"),
    ('input [ { name: "a" dims: [ 1 ] } ]', "input 0 'a': 'data_type' is required"),
    ('output [ { name: "b" data_type: TYPE_FP32 } ]', "output 0 'b': 'dims' is required"),
    ('input [ { name: "a" data_type: TYPE_FP32 dims: [ 0 ] } ]', "may hold only positive sizes or -1"),
    ('input [ { name: "a" data_type: TYPE_FP32 dims: [ 1 ] },\n'
     '        { name: "a" data_type: TYPE_FP32 dims: [ 1 ] } ]', "input 'a' is defined more than once"),
    ('max_batch_size: -1', "max_batch_size must be >= 0, got -1"),
    ('dynamic_batching { priority_levels: 2 default_priority_level: 3 }',
     "default_priority_level must be between 1 and priority_levels 2, got 3"),
    ('dynamic_batching { priority_levels: 2 }', "default_priority_level must be between 1 and priority_levels 2"),
    ('dynamic_batching { priority_levels: 2 default_priority_level: 1 priority_queue_policy { key: 5 value: {} } }',
     "priority_queue_policy level 5 must be between 1 and priority_levels 2"),
    ('dynamic_batching { default_priority_level: 1 }', "need priority_levels > 0"),
])
def test_invalid_configs_are_rejected_with_the_problem(tmp_path, tensor, problem):
    folder = model_folder(tmp_path, "m", f'backend: "python"\n{tensor}')
    with pytest.raises(ConfigError) as error:
        read_config(folder)
    assert problem in str(error.value)
    # the error names the file within the repository, never the server's absolute path
    assert str(error.value).startswith("m/config.pbtxt: ")
    assert str(tmp_path) not in str(error.value)


def test_json_view_is_tritons():
    config = parse_config(
        'name: "m" backend: "python" max_batch_size: 8\n'
        'input [ { name: "x" data_type: TYPE_FP32 dims: [ -1, 16 ] } ]\n'
        'dynamic_batching { preferred_batch_size: [ 4, 8 ] max_queue_delay_microseconds: 100 }\n'
        'parameters { key: "k" value { string_value: "v" } }'
    )
    data = config_to_json(config)
    assert data["max_batch_size"] == 8
    assert data["input"][0]["data_type"] == "TYPE_FP32"
    assert data["input"][0]["dims"] == [-1, 16]  # int64 as numbers, not protobuf's strings
    assert data["dynamic_batching"]["max_queue_delay_microseconds"] == 100
    assert data["dynamic_batching"]["preferred_batch_size"] == [4, 8]
    assert data["parameters"] == {"k": {"string_value": "v"}}
    assert data["platform"] == ""  # defaults are printed, as Triton does


def test_config_json_override_parses():
    config = parse_config_json('{"backend": "python", "version_policy": {"all": {}}}')
    assert config.backend == "python" and config.version_policy.HasField("all")
    with pytest.raises(ConfigError, match="config override"):
        parse_config_json('{"backend": 3')


@pytest.mark.parametrize("policy, expected", [
    ("", [3]),
    ("version_policy { latest { num_versions: 2 } }", [2, 3]),
    ("version_policy { all { } }", [1, 2, 3]),
    ("version_policy { specific { versions: [ 1, 3 ] } }", [1, 3]),
])
def test_version_policy(policy, expected):
    assert select_versions(parse_config(policy), [1, 2, 3]) == expected


def test_version_policy_errors():
    with pytest.raises(ConfigError, match=r"asks for version\(s\) \[4\]"):
        select_versions(parse_config("version_policy { specific { versions: [ 4 ] } }"), [1, 2])
    with pytest.raises(ConfigError, match="no version folders"):
        select_versions(parse_config(""), [])
