"""Verbs: the operations steps perform, their registry and argument templating."""

from stepline.executor.verbs.base import GeneratorVerb, Verb, VerbContext, VerbError
from stepline.executor.verbs.http import HostAllowList, HttpRequest
from stepline.executor.verbs.registry import (
    ENTRY_POINT_GROUP,
    RegisteredVerb,
    VerbRegistry,
    is_allowed,
    load_plugins,
    register_builtins,
)
from stepline.executor.verbs.templating import check_template, render

__all__ = [
    "ENTRY_POINT_GROUP",
    "GeneratorVerb",
    "HostAllowList",
    "HttpRequest",
    "RegisteredVerb",
    "Verb",
    "VerbContext",
    "VerbError",
    "VerbRegistry",
    "check_template",
    "is_allowed",
    "load_plugins",
    "register_builtins",
    "render",
]
