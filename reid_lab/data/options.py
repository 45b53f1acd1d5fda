"""Typed values in free-form option mappings given on the command line.

A dotted override into a ``dict`` option (``--data.init_args.dataset_options.num_query_per_id 2``,
``--model.init_args.model_cfg.text_config.num_hidden_layers 1``) reaches the code as the *string* ``"2"``:
jsonargparse cannot know the type of a key inside a plain ``dict``. :func:`typed_options` reads such strings
as YAML scalars (``"2"`` -> 2, ``"0.5"`` -> 0.5, ``"true"`` -> True, ``"[1, 2]"`` -> [1, 2]); any other string
stays a string.

>>> typed_options({"n": "2", "name": "labeled", "cfg": {"rate": "0.5", "flag": "true"}, "ids": ["3", 4]})
{'n': 2, 'name': 'labeled', 'cfg': {'rate': 0.5, 'flag': True}, 'ids': [3, 4]}
"""

from __future__ import annotations

from typing import Any

import yaml


def _typed(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _typed(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_typed(v) for v in value]
    if isinstance(value, str):
        try:
            parsed = yaml.safe_load(value)
        except yaml.YAMLError:
            return value
        return parsed if isinstance(parsed, (bool, int, float, list, dict)) else value
    return value


def typed_options(options: dict[str, Any] | None) -> dict[str, Any]:
    """``options`` with YAML-scalar strings read as their values (recursively; see the module docstring)."""
    return _typed(dict(options or {}))
