"""The test suite (a regular package: neonize's dependency linkpreview installs a top-level
`tests` package into site-packages, which would otherwise shadow this one)."""
