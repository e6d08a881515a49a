"""Optimizees: task families of pure, vmappable problems."""

from tasks.base import TaskFamily
from tasks.quadratic import quadratic
from tasks.registry import get, names, register

__all__ = ["TaskFamily", "get", "names", "quadratic", "register"]
