"""Drivers of real peers (DCMTK, Orthanc, dciodvfy), synthetic radiographs and benchmarks. For tests and benchmarks only: the service never imports this wing."""
