// Every collection here boots a qemu VM under TCG. Two or three of them at once on a 2-core CI machine starve each
// other, and the fault suite asserts stalls measured in hundreds of milliseconds: the VM runs go one at a time.
[assembly: CollectionBehavior(DisableTestParallelization = true)]
