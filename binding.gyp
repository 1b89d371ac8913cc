{
  "target_defaults": {
    "cflags_cc": ["-O3", "-ffp-contract=off", "-fno-fast-math"]
  },
  "targets": [
    {
      "target_name": "limb_kernels_avx512",
      "type": "static_library",
      "sources": ["aggregator/kernel/native/kernels.cc"],
      "defines": ["KERNEL_NAMESPACE=avx512", "KERNEL_NAME=\"avx512f\""],
      "cflags_cc": ["-mavx512f", "-Wno-maybe-uninitialized"]
    },
    {
      "target_name": "limb_kernels_avx2",
      "type": "static_library",
      "sources": ["aggregator/kernel/native/kernels.cc"],
      "defines": ["KERNEL_NAMESPACE=avx2", "KERNEL_NAME=\"avx2\""],
      "cflags_cc": ["-mavx2"]
    },
    {
      "target_name": "limb_kernels_baseline",
      "type": "static_library",
      "sources": ["aggregator/kernel/native/kernels.cc"],
      "defines": ["KERNEL_NAMESPACE=baseline", "KERNEL_NAME=\"baseline\""]
    },
    {
      "target_name": "limbs",
      "sources": [
        "aggregator/kernel/native/addon.cc",
        "aggregator/kernel/native/dispatch.cc"
      ],
      "dependencies": [
        "limb_kernels_avx512",
        "limb_kernels_avx2",
        "limb_kernels_baseline"
      ]
    }
  ]
}
