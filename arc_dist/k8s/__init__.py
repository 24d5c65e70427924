"""Kubernetes manifests for arc-dist runs, shipped with the package.

``manifests/`` holds one commented example per kind (Indexed Job + Service, JobSet, Kubeflow
Trainer v2 TrainJob + TrainingRuntime, legacy PyTorchJob, RayJob) and the shared ConfigMap;
``schemas/`` the JSON Schemas of the custom resources, for offline validation;
:mod:`arc_dist.k8s.render` sets one run's values in them (``arc-dist k8s``). See
docs/kubernetes.md.
"""
