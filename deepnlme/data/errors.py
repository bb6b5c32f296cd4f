"""The one exception type raised for unusable input data."""

from __future__ import annotations


class DataValidationError(ValueError):
    """A data table cannot be used; the message names the file, the row and the column.

    Messages have the form ``"{file}: row {row}, column {COLUMN}: {problem}"`` where ``row``
    is the 1-based data row (the first line under the header is row 1; row 0 is the header).
    """
