"""The graded course exercises (a package, so that its conftest is not the module `conftest` of tests/)."""
