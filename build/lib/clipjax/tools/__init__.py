"""Command-line tools around clipjax: data conversion and export."""
