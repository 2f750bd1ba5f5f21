"""The benchmark harness, fitting and the capacity planner."""
