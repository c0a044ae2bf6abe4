"""The chapters' Markdown tables: a "|" inside a cell must not break the table."""

from dmlib.plot import markdown_table


def test_markdown_table_formats_and_escapes():
    text = markdown_table(["kind", "max |a - b|"], [["uniform", 0.12345], ["x|y", 3]])
    lines = text.split("\n")
    assert lines[0] == "| kind | max \\|a - b\\| |"  # an unescaped "|" would add a column
    assert lines[1] == "|---|---|"
    assert lines[2] == "| uniform | 0.123 |"  # floats with the default format
    assert lines[3] == "| x\\|y | 3 |"  # anything else with str
    assert markdown_table(["a"], [[0.5]], fmt="{:.1e}").endswith("| 5.0e-01 |")
