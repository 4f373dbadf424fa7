"""Make PaCA a PEFT method: PEFT keys its registries on members of the PeftType enum."""

from __future__ import annotations

from peft.utils import PeftType


def _add_peft_type(name: str) -> PeftType:
    """Return ``PeftType[name]``, adding the member if this PEFT release does not know it yet."""
    if name in PeftType.__members__:
        return PeftType[name]
    member = str.__new__(PeftType, name)
    member._name_, member._value_ = name, name
    member.__objclass__ = PeftType
    PeftType._member_map_[name] = member
    PeftType._value2member_map_[name] = member
    PeftType._member_names_.append(name)
    type.__setattr__(PeftType, name, member)
    return member


PACA_PEFT_TYPE = _add_peft_type("PACA")
