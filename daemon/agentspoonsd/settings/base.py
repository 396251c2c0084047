"""What every config table shares: unknown keys refused, frozen, no boolean taken for a number."""

from __future__ import annotations

import re
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationInfo, field_validator

SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")


class Section(BaseModel):
    """A config table: unknown keys are errors, values are frozen once validated."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_as_number(cls, value: Any, info: ValidationInfo) -> Any:
        # pydantic's lax mode reads `port = true` as 1; in a config file that is a mistake.
        # The ignore: field_name is None only for model validators, never for this "*" one.
        annotation = cls.model_fields[info.field_name].annotation  # type: ignore[index]
        if isinstance(value, bool) and annotation in (int, float, int | None, float | None):
            raise ValueError("must be a number, not a boolean")
        return value
