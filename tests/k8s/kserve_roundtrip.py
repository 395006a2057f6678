"""Run in the KServe SDK venv: read InferenceService documents (a JSON list) on stdin,
deserialize each into the SDK's V1beta1InferenceService model and serialize it back;
print the results (a JSON list). A field the v1beta1 API does not know is dropped on the
way, so the caller compares input and output to find misspelt or misplaced fields."""

import json
import re
import sys

import kserve.models
import kubernetes.client.models
from kserve import ApiClient

PRIMITIVES = {"str": str, "int": int, "float": float, "bool": bool}


def model_class(name: str):
    # v1beta1 models embed Kubernetes' own (V1Container, V1ObjectMeta...).
    return getattr(kserve.models, name, None) or getattr(kubernetes.client.models, name)


def deserialize(data, type_name: str):
    """``data`` as the model ``type_name`` names; both SDKs' type notations (``list[X]``,
    ``dict(str, X)``, ``List[X]``, ``Dict[str, X]``) are understood."""
    if data is None:
        return None
    if m := re.fullmatch(r"(?:list|List)\[(.*)\]", type_name):
        return [deserialize(item, m.group(1)) for item in data]
    if m := re.fullmatch(r"(?:dict\(|Dict\[)[^,]*, (.*)[)\]]", type_name):
        return {k: deserialize(v, m.group(1)) for k, v in data.items()}
    if type_name in PRIMITIVES:
        return PRIMITIVES[type_name](data)
    if type_name in ("object", "datetime", "date"):
        return data
    cls = model_class(type_name)
    kwargs = {attr: deserialize(data[cls.attribute_map[attr]], t)
              for attr, t in cls.openapi_types.items() if cls.attribute_map[attr] in data}
    return cls(**kwargs)


def main() -> None:
    client = ApiClient()
    out = [client.sanitize_for_serialization(deserialize(doc, "V1beta1InferenceService")) for doc in json.load(sys.stdin)]
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()
