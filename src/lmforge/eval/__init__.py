"""Evaluation: bits per byte, multiple choice by log-likelihood, generative exact match, code in a sandbox."""
