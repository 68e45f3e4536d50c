"""Helpers shared by the tests: synthetic clips with known content and deliberately broken inputs."""
