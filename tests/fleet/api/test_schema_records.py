"""The API's output models agree with the records they are read from (`from_attributes`).

Why: `DeviceOut` and `JobOut` repeat the fields of `Device` and `TrainingJob` so that the
OpenAPI document describes them; a field renamed or retyped on one side only would surface as
a 500 on the route (a missing attribute) or as a silently coerced value (an int where the record
holds a float). This pins the two sides together: every field of the output model exists on the
record with the same type.
"""

from __future__ import annotations

import dataclasses
import typing

import pytest
from pydantic import BaseModel

from fleet.api.schemas import DeviceOut
from fleet.api.training import JobOut
from fleet.devices.inventory import Device
from fleet.training.jobs import TrainingJob

PAIRS = [(DeviceOut, Device), (JobOut, TrainingJob)]


@pytest.mark.unit
@pytest.mark.parametrize(("model", "record"), PAIRS, ids=[m.__name__ for m, _ in PAIRS])
def test_every_output_field_is_a_record_field_of_the_same_type(model: type[BaseModel], record: type) -> None:
    hints = typing.get_type_hints(record)
    names = {f.name for f in dataclasses.fields(record)}
    for name, field in model.model_fields.items():
        assert name in names, f"{model.__name__}.{name} is not a field of {record.__name__}"
        assert field.annotation == hints[name], (
            f"{model.__name__}.{name} is {field.annotation}, {record.__name__}.{name} is {hints[name]}")


@pytest.mark.unit
def test_the_check_notices_a_field_the_record_does_not_have() -> None:
    class Drifted(DeviceOut):
        nickname: str = ""

    with pytest.raises(AssertionError, match="nickname is not a field"):
        test_every_output_field_is_a_record_field_of_the_same_type(Drifted, Device)
