"""The curation stages, one module each: pure functions on DataFrames plus a thin Prefect task.

``listing -> diff -> inspect -> duplicates -> split -> expectations -> publish -> report``
"""

__all__: list[str] = []
