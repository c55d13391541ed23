"""A model is not its own teacher: a teacher that is the student, shares its tensors, or (on the
magic line, ``--teacher NAME@K``) is the student's current version is refused before any work."""
from __future__ import annotations

from torch import nn

from ...core import FieldError
from ...fingerprint import _same_state
from ...options import split_names

__all__ = ["shared_parameters", "check_teachers_apart", "check_magic_teachers"]


def _storage_keys(model: nn.Module) -> dict:
    """{(device, storage address): parameter name} of the model's parameters (a tied or viewed
    tensor shares its storage, so it is found even when it is not the same Parameter object)."""
    keys = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        try:
            ptr = p.untyped_storage().data_ptr()
        except Exception:  # noqa: BLE001 - uninitialised / meta tensors have no storage
            continue
        if ptr:
            keys.setdefault((str(p.device), ptr), name)
    return keys


def shared_parameters(student: nn.Module, teacher: nn.Module) -> list[str]:
    """Names (in ``teacher``) of the teacher's parameters that are also the student's: the same
    tensor object or the same storage. Empty when the two models are separate."""
    s_ids = {id(p) for p in student.parameters()}
    s_keys = _storage_keys(student)
    shared = []
    for key, name in _storage_keys(teacher).items():
        if key in s_keys:
            shared.append(name)
    for name, p in teacher.named_parameters():
        if id(p) in s_ids and name not in shared:
            shared.append(name)
    return shared


def check_teachers_apart(student: nn.Module, teachers: list, student_name: str | None = None,
                         teacher_names: list[str] | None = None,
                         earlier: str | None = None) -> None:
    """Refuse (one-line :class:`FieldError`) a teacher that is the student itself, or that shares
    parameter tensors with it: the student would be distilled from itself. ``student_name``,
    ``teacher_names`` (the notebook names, from the magic) and ``earlier`` (how to name an earlier
    version of the student, a FieldError template) only make the message clearer."""
    s = student_name or "the student"
    for i, t in enumerate(teachers):
        if not isinstance(t, nn.Module):
            continue
        tname = teacher_names[i] if teacher_names and i < len(teacher_names) else None
        who = f"the teacher {tname}" if tname else \
            ("the teacher" if len(teachers) == 1 else f"teacher {i + 1}")
        if t is student:
            where = f" ({tname})" if tname else ""
            earlier = earlier or ("{teacher_version=0} through a History: the model as first "
                                  "registered")
            raise FieldError(f"the teacher is the student itself{where}: distil from another "
                             f"model, or from an earlier version of it ({earlier})")
        shared = shared_parameters(student, t)
        if shared:
            n = len(shared)
            raise FieldError(f"{who} shares {n} parameter tensor{'s' if n != 1 else ''} with {s} "
                             f"(e.g. {shared[0]}): a teacher must be a separate model; distil "
                             f"from another model or from a copy (copy.deepcopy)")


def check_magic_teachers(magics, name: str, teachers: list, local_ns, typed: str) -> None:
    """The magic's checks (``--teacher`` as typed, ``typed``, for the student named ``name``): a
    teacher is neither the student nor the student's current version ``NAME@K``."""
    student = magics.lookup_model(name, local_ns)
    h = magics.workspace.get(name)
    names = split_names(typed)
    for token, teacher in zip(names, teachers):
        owner, at, k = token.rpartition("@")
        if at and owner == name and h is not None and k == str(h.pos) and \
                _same_state(teacher, student):      # not edited in place since: the same model
            raise FieldError(_current_version(name, h.pos))
    earlier = (f"{{teachers='{name}@0'}}: {name} as first registered"
               if h is not None and (h.pos > 0 or h.current is not student) else
               f"{{teachers='{name}@0'}} once {name} has been compressed")
    check_teachers_apart(student, teachers, name, names, earlier)


def _current_version(student: str, pos: int) -> str:
    """The message for a ``--teacher NAME@K`` that is the student's current version."""
    token = f"{student}@{pos}"
    if pos:
        return (f"{{teachers='{token}'}} is the student {student} itself (the current version): "
                f"pick an earlier one ({student}@0..{student}@{pos - 1}) or another model")
    return (f"{{teachers='{token}'}} is the student {student} itself (the current version; "
            f"{student} has no earlier one yet): distil from another model, or compress "
            f"{student} first")
