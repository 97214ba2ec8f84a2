"""What a MedMIX network is built from, read off the data and the experts, and the check that a
rebuilt model meets data of the same shape."""

from __future__ import annotations

from typing import Any

from midol.fusion.experts import ExpertSpec


def structure_from(table: Any, expert_specs: dict[str, list[ExpertSpec]],
                   teacher_specs: dict[str, ExpertSpec],
                   expert_recipes: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """The structure the data and the experts imply (JSON-able): the inputs with what each
    needs (modality; tabular widths and vocabularies; embedding width), the task, the label
    names, the experts' recipes of the modalities used and the teachers' widths (-1 until
    known). Stored in the hyper-parameters, so a checkpoint rebuilds the network without data."""
    inputs: list[dict[str, Any]] = []
    for spec in table.inputs:
        entry: dict[str, Any] = {"name": spec.name, "kind": spec.kind}
        if spec.kind == "image":
            modality = spec.modality or spec.name
            if modality not in expert_specs:
                raise ValueError(f"image input {spec.name!r} has modality {modality!r} but "
                                 f"experts name only {sorted(expert_specs)}")
            entry["modality"] = modality
        elif spec.kind == "tabular":
            arrays = table.tabular(spec.name)
            entry.update(num_numeric=int(arrays.numeric.shape[1]),
                         cardinalities=[int(c) for c in arrays.cardinalities],
                         vocab=[list(v) for v in arrays.vocab])
        else:
            entry["dim"] = int(table.embeddings(spec.name).shape[1])
        inputs.append(entry)
    used = {e["modality"] for e in inputs if e["kind"] == "image"}
    teacher_dims: dict[str, int] = {}
    for e in inputs:
        if e["kind"] == "image" and e["modality"] in teacher_specs:
            teacher_dims[e["name"]] = -1  # filled once the teacher's width is known
    return {"inputs": inputs, "task": table.task, "label_names": list(table.label_names),
            "experts": {m: expert_recipes[m] for m in expert_specs if m in used},
            "teacher_dims": teacher_dims}


def check_same_structure(old: dict[str, Any], new: dict[str, Any]) -> None:
    """A rebuilt model's structure against the data's: one line naming what changed."""
    keys = ("inputs", "task", "label_names")
    for key in keys:
        if old.get(key) != new.get(key):
            raise ValueError(
                f"the data do not match the model this checkpoint built: {key} were "
                f"{old.get(key)} and are now {new.get(key)}")
    old_dims = {m: [r["dim"] for r in rs] for m, rs in old["experts"].items()}
    new_dims = {m: [r["dim"] for r in rs] for m, rs in new["experts"].items()}
    if old_dims != new_dims:
        raise ValueError(f"expert widths changed from {old_dims} to {new_dims}")
