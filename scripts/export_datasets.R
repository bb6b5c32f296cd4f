#!/usr/bin/env Rscript
# Export the bundled example datasets of deepnlme as NONMEM-style event tables.
#
#   Rscript scripts/export_datasets.R            # writes into deepnlme/data/datasets/
#
# theophylline.csv  datasets::Theoph: 12 subjects, one oral dose (mg/kg) at TIME 0 into the
#                   depot (CMT 1), 132 serum concentrations (mg/L), covariate WT (kg).
#                   The dose row precedes the time-0 observation.
# phenobarbital.csv nlme::Phenobarb (NONMEM's "pheno"): 59 neonates, IV bolus doses (CMT 1),
#                   155 serum concentrations, covariates WT (kg) and APGAR (1-10).
# Observation rows use CMT 0, the model's default observed compartment.

suppressPackageStartupMessages(library(nlme))

out_dir <- if (length(commandArgs(TRUE)) > 0) commandArgs(TRUE)[1] else
  file.path("deepnlme", "data", "datasets")

write_table <- function(df, file) {
  df$DV <- ifelse(is.na(df$DV), ".", as.character(df$DV))
  write.csv(df, file.path(out_dir, file), row.names = FALSE, quote = FALSE)
}

# ---------------------------------------------------------------- theophylline
th <- as.data.frame(datasets::Theoph)
th$Subject <- as.character(th$Subject)
subjects <- unique(th$Subject)  # row order of the R data frame
rows <- lapply(subjects, function(s) {
  d <- th[th$Subject == s, ]
  dose <- data.frame(ID = s, TIME = 0, AMT = d$Dose[1], DV = NA, EVID = 1, MDV = 1,
                     CMT = 1, WT = d$Wt[1])
  obs <- data.frame(ID = s, TIME = d$Time, AMT = 0, DV = d$conc, EVID = 0, MDV = 0,
                    CMT = 0, WT = d$Wt)
  rbind(dose, obs)
})
write_table(do.call(rbind, rows), "theophylline.csv")

# --------------------------------------------------------------- phenobarbital
pb <- as.data.frame(Phenobarb)
is_dose <- !is.na(pb$dose)
stopifnot(all(xor(is_dose, !is.na(pb$conc))))
pheno <- data.frame(
  ID = as.character(pb$Subject),
  TIME = pb$time,
  AMT = ifelse(is_dose, pb$dose, 0),
  DV = pb$conc,
  EVID = ifelse(is_dose, 1, 0),
  MDV = ifelse(is_dose, 1, 0),
  CMT = ifelse(is_dose, 1, 0),
  WT = pb$Wt,
  APGAR = as.integer(as.character(pb$Apgar))
)
write_table(pheno, "phenobarbital.csv")
