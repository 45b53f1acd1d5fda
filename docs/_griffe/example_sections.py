"""A griffe extension for the API pages: reid_lab's docstrings head their doctests ``Example:``.

Griffe's Google-style parser knows ``Examples:`` only and would render an ``Example:`` section as an admonition
of prose, where a doctest output such as ``[2, 4, 6]`` reads as a Markdown link reference and fails the strict
build. This renames the heading while the docstrings are loaded; the source files stay as they are.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_EXAMPLE = re.compile(r"^(\s*)Example:[ \t]*$", re.MULTILINE)


class ExampleSections(griffe.Extension):
    """Read every ``Example:`` section heading as ``Examples:`` (doctest blocks rendered as code)."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = _EXAMPLE.sub(r"\1Examples:", obj.docstring.value)
