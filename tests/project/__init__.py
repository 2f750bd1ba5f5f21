"""The project as a whole: linters, layout and import graph, the README."""
