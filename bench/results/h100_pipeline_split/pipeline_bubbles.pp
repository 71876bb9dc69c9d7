{
  "device_kind": "NVIDIA H100 80GB HBM3",
  "costs_s": {
    "F": 0.006659446000000457,
    "B": 0.0193497319999949,
    "W": 0.00442173749999597,
    "BW": 0.02272769599999691,
    "head": 0.0026796789999963266
  },
  "rows": [
    {
      "schedule": "gpipe",
      "stages": 2,
      "microbatches": 8,
      "simulated_s": 0.2859217099999469,
      "simulated_bubble": 0.14026867004953947
    },
    {
      "schedule": "1f1b",
      "stages": 2,
      "microbatches": 8,
      "simulated_s": 0.3983994599999221,
      "simulated_bubble": 0.3829915030507012
    },
    {
      "schedule": "zb-h1",
      "stages": 2,
      "microbatches": 8,
      "simulated_s": 0.39315218699988463,
      "simulated_bubble": 0.35351742046906
    }
  ]
}