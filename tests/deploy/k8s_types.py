"""Strict offline validation of Kubernetes objects against the Kubernetes Python client's
generated types (the API's OpenAPI schema): every key must be a field of its type and every
value of the field's type. Custom resources (KServe, KubeRay) are checked by validating the
core objects they embed (containers, pod templates) this way."""

from __future__ import annotations

from typing import Any

from kubernetes.client import models

PRIMITIVES: dict[str, tuple[type, ...]] = {
    "str": (str,), "int": (int,), "bool": (bool,), "float": (int, float),
    "datetime": (str,), "date": (str,), "object": (object,),
}  # fmt: skip


def validate(data: Any, type_name: str, path: str = "$") -> None:
    """Raise AssertionError naming the path of the first value that does not fit."""
    if type_name.lower().startswith("list["):  # "List[V1EnvVar]" (older clients: "list[...]")
        assert isinstance(data, list), f"{path}: expected a list"
        for i, item in enumerate(data):
            validate(item, type_name[5:-1], f"{path}[{i}]")
        return
    if type_name.lower().startswith(("dict[", "dict(")):  # "Dict[str, str]"
        assert isinstance(data, dict), f"{path}: expected a mapping"
        inner = type_name[type_name.index(",") + 1 : -1].strip()
        for key, value in data.items():
            validate(value, inner, f"{path}.{key}")
        return
    if type_name in PRIMITIVES:
        ok = isinstance(data, PRIMITIVES[type_name]) and not (
            type_name == "int" and isinstance(data, bool)
        )
        assert ok, f"{path}: {data!r} is not a {type_name}"
        return
    cls = getattr(models, type_name)
    assert isinstance(data, dict), f"{path}: expected a {type_name} mapping"
    fields = {wire: attr for attr, wire in cls.attribute_map.items()}
    for key, value in data.items():
        assert key in fields, f"{path}.{key}: not a field of {type_name}"
        validate(value, cls.openapi_types[fields[key]], f"{path}.{key}")
